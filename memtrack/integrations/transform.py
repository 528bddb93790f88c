"""The image transform a training run used, read from where the run states it, and checked against the index.

The pixel space indexes the views the training transform can show the model (resolution, interpolation,
crop, flip; :mod:`memtrack.embedders.pixel`), so an index built for another transform misses copies: a
run that flips needs the mirrored views, a run that crops at random needs the crop offsets. This module
reads the run's transform, field by field, from the first source that states it:

1. the config's ``data.transform`` (a field set there wins: the user knows best);
2. the launched command (``memtrack launch``): ``--resolution``, ``--center_crop``, ``--random_flip``,
   ``--image_interpolation_mode``; for diffusers' own scripts (:data:`SCRIPTS`) a flag left out means the
   script's default (no ``--center_crop``: random crops; no ``--random_flip``: no flip);
3. the run's ``hparams.yml``: accelerate's tensorboard tracker writes the script's arguments to
   ``OUTPUT_DIR/LOGGING_DIR/<project>/<time>/hparams.yml`` when the script passes them to
   ``init_trackers`` (train_text_to_image*.py and train_dreambooth*.py do; train_unconditional.py does not).

A field no source states is not checked (and the report says so). Where the run and the index disagree,
:func:`verify_run_transform` refuses with both values, their sources and the ``memtrack index build``
command that builds the right index.

Example:
    >>> run = read_run_transform(cfg, command=["accelerate", "launch", "train_unconditional.py",
    ...                                        "--resolution", "64", "--random_flip"])
    >>> run.values()
    {'resolution': 64, 'crop': 'random', 'flip': True, 'interpolation': 'bilinear'}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from memtrack.errors import FingerprintMismatch
from memtrack.utils import get_logger
from memtrack.integrations.options import script_flag

logger = get_logger(__name__)

FIELDS = ("resolution", "crop", "flip", "interpolation")


@dataclass(frozen=True)
class ScriptDefaults:
    """What one of diffusers' scripts does when a transform flag is left out."""

    resolution: int
    interpolation: str           # the --image_interpolation_mode default, or the hard-coded filter
    interpolation_flag: bool     # the script has --image_interpolation_mode
    flip_flag: bool              # the script has --random_flip


#: diffusers' example scripts (huggingface/diffusers examples/; docs/transform.md has the table)
SCRIPTS = {
    "train_unconditional.py": ScriptDefaults(64, "bilinear", False, True),
    "train_text_to_image.py": ScriptDefaults(512, "lanczos", True, True),
    "train_text_to_image_lora.py": ScriptDefaults(512, "lanczos", True, True),
    "train_text_to_image_sdxl.py": ScriptDefaults(1024, "lanczos", True, True),
    "train_text_to_image_lora_sdxl.py": ScriptDefaults(1024, "lanczos", True, True),
    "train_dreambooth.py": ScriptDefaults(512, "bilinear", False, False),
    "train_dreambooth_lora.py": ScriptDefaults(512, "lanczos", True, False),
    "train_dreambooth_lora_sdxl.py": ScriptDefaults(1024, "lanczos", True, True),
}


class TransformMismatch(FingerprintMismatch):
    """The training run's image transform differs from the one the reference index was built for."""


@dataclass
class Stated:
    """One field of the run's transform and where it was read."""

    value: object
    source: str

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


@dataclass
class RunTransform:
    """The run's transform, as far as it is known: field -> :class:`Stated`."""

    fields: dict = field(default_factory=dict)

    def values(self) -> dict:
        return {k: s.value for k, s in self.fields.items()}

    def unknown(self) -> list[str]:
        return [f for f in FIELDS if f not in self.fields]

    def fill(self, other: dict) -> None:
        """Take the fields of ``other`` that are not known yet (a later, weaker source)."""
        for k, s in other.items():
            self.fields.setdefault(k, s)

    def to_dict(self) -> dict:
        return {k: s.to_dict() for k, s in self.fields.items()}


# ------------------------------------------------------------------------------------------ sources


def script_name(argv: Sequence[str]) -> Optional[str]:
    """The training script's file name in a command line (``-m pkg.mod`` gives ``mod.py``)."""
    for i, tok in enumerate(argv):
        if tok.endswith(".py"):
            return Path(tok).name
        if tok in ("-m", "--module") and i + 1 < len(argv) and i > 0:
            return argv[i + 1].rsplit(".", 1)[-1] + ".py"
    return None


def from_command(argv: Sequence[str]) -> dict:
    """The transform fields a command line states (flags given, or the known script's defaults)."""
    argv = list(argv)
    name = script_name(argv)
    script = SCRIPTS.get(name or "")
    out: dict[str, Stated] = {}
    res = script_flag(argv, "--resolution")
    if res is not None and res.isdigit():
        out["resolution"] = Stated(int(res), f"command: --resolution {res}")
    elif script:
        out["resolution"] = Stated(script.resolution, f"{name} default (no --resolution)")
    if "--center_crop" in argv:
        out["crop"] = Stated("center", "command: --center_crop")
    elif script:
        out["crop"] = Stated("random", f"{name} default (no --center_crop: RandomCrop)")
    if "--random_flip" in argv:
        out["flip"] = Stated(True, "command: --random_flip")
    elif script:
        out["flip"] = Stated(False, f"{name} default (no --random_flip)" if script.flip_flag
                             else f"{name} never flips")
    mode = script_flag(argv, "--image_interpolation_mode")
    if mode is not None:
        out["interpolation"] = Stated(mode.lower(), f"command: --image_interpolation_mode {mode}")
    elif script:
        out["interpolation"] = Stated(script.interpolation, f"{name} default" if script.interpolation_flag
                                      else f"{name} resizes {script.interpolation}")
    return out


def hparams_files(run_dir: str | Path, logging_dir: str | Path | None = None) -> list[Path]:
    """``hparams.yml`` files accelerate's tensorboard tracker wrote for a run, newest first."""
    run_dir = Path(run_dir)
    roots = [run_dir / logging_dir] if logging_dir is not None else []
    roots.append(run_dir / "logs")
    found = {p for root in roots for p in root.glob("*/*/hparams.yml")} | set(run_dir.glob("*/*/*/hparams.yml"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _load_yaml(path: Path) -> dict | None:
    """The mapping in ``path``; objects yaml.dump tagged (``!!python/...``, e.g. a Path) read as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        logger.warning("cannot read the run's hyperparameters %s (%s); its transform is not read from it", path, exc)
        return None
    return data if isinstance(data, dict) else None


def from_hparams(path: Path) -> dict:
    """The transform fields a run's ``hparams.yml`` records (the script's own argument names)."""
    data = _load_yaml(path)
    if not data:
        return {}
    out: dict[str, Stated] = {}
    where = f"hparams: {path}"
    if isinstance(data.get("resolution"), int) and not isinstance(data["resolution"], bool):
        out["resolution"] = Stated(data["resolution"], f"{where} resolution")
    if isinstance(data.get("center_crop"), bool):
        out["crop"] = Stated("center" if data["center_crop"] else "random", f"{where} center_crop")
        # the args of one of diffusers' scripts: a flag it lacks is a transform it does not make
        if "random_flip" not in data:
            out["flip"] = Stated(False, f"{where} (no random_flip argument: the script never flips)")
        if "image_interpolation_mode" not in data:
            out["interpolation"] = Stated("bilinear", f"{where} (no image_interpolation_mode argument: "
                                                      "the script resizes bilinear)")
    if isinstance(data.get("random_flip"), bool):
        out["flip"] = Stated(data["random_flip"], f"{where} random_flip")
    if isinstance(data.get("image_interpolation_mode"), str):
        out["interpolation"] = Stated(data["image_interpolation_mode"].lower(), f"{where} image_interpolation_mode")
    return out


def read_run_transform(cfg, *, command: Sequence[str] | None = None, run_dir: str | Path | None = None,
                       logging_dir: str | Path | None = None) -> RunTransform:
    """The run's transform: config ``data.transform`` > the command > the newest hparams.yml (module doc)."""
    stated = cfg.data.transform.set_fields()
    run = RunTransform({k: Stated(v, f"config: data.transform.{k}") for k, v in stated.items()})
    if command:
        run.fill(from_command(command))
    if run_dir is not None and run.unknown():
        files = hparams_files(run_dir, logging_dir)
        if files:
            newest = from_hparams(files[0])
            for older in files[1:]:
                diff = {k for k, s in from_hparams(older).items() if k in newest and newest[k].value != s.value}
                if diff:
                    logger.warning("the run's hparams files disagree on %s; using the newest, %s",
                                   ", ".join(sorted(diff)), files[0])
                    break
            run.fill(newest)
    return run


# ------------------------------------------------------------------------------------------ checking


def index_transforms(ref) -> dict:
    """``space -> transform`` for the index's spaces that follow the training transform (the pixel space)."""
    return {name: dict(sp.fingerprint["transform"]) for name, sp in ref.spaces.items()
            if isinstance(sp.fingerprint.get("transform"), dict)}


def differences(run: RunTransform, transform: dict) -> list[str]:
    """The fields the run states and the index's ``transform`` records differently, each named with both."""
    return [f"{k}: the run has {s.value!r} ({s.source}), the index {transform[k]!r}"
            for k, s in run.fields.items() if k in transform and transform[k] != s.value]


def rebuild_command(ref, space: str, run: RunTransform) -> str:
    """The ``memtrack index build`` command that rebuilds ``ref`` for the run's transform."""
    import shlex

    sp = ref.spaces[space]
    want = {**{k: sp.fingerprint["transform"].get(k) for k in FIELDS}, **run.values()}
    root = (ref.manifest.get("dataset") or {}).get("root", "DATA")
    parts = ["memtrack", "index", "build", root, "--out", str(ref.path), "--overwrite",
             "--embedders", ",".join(ref.spaces)]
    if isinstance(sp.fingerprint.get("resolution"), int) and isinstance(want["resolution"], int):
        parts += ["--resolution", str(min(sp.fingerprint["resolution"], want["resolution"]))]
        parts += ["--train-resolution", str(want["resolution"])]
    if want["crop"] in ("center", "random"):
        parts.append(f"--{want['crop']}-crop")
    parts.append("--random-flip" if want["flip"] else "--no-random-flip")
    if want["interpolation"]:
        parts += ["--interpolation", str(want["interpolation"])]
    return " ".join(shlex.quote(p) for p in parts)


def verify_run_transform(ref, cfg, run_dir: str | Path | None = None, *, command: Sequence[str] | None = None,
                         store=None) -> dict:
    """Read the run's transform (:func:`read_run_transform`), refuse an index built for another one, and
    record what was read and from where in ``store`` (meta ``training_transform``, shown in summary.json's
    ``index`` block). Returns that record.

    Raises:
        TransformMismatch: a field the run states differs from the index's (exit code 2 in the CLI).
    """
    logging_dir = cfg.tracking.logging_dir or (script_flag(list(command), "--logging_dir") if command else None)
    run = read_run_transform(cfg, command=command, run_dir=run_dir, logging_dir=logging_dir)
    spaces = index_transforms(ref)
    for name, transform in spaces.items():
        diff = differences(run, transform)
        if diff:
            raise TransformMismatch(
                f"the training run's image transform differs from the one the {name!r} space of the index at "
                f"{ref.path} was built for: " + "; ".join(diff),
                hint=f"rebuild the index for this run: {rebuild_command(ref, name, run)} (add the --config it "
                     "was built with, for the other spaces' options; or set data.transform in the config where a "
                     "value read from the run is wrong)")
    record = {"run": run.to_dict(), "unknown": run.unknown(), "index": spaces,
              "checked": sorted(k for k in run.fields if any(k in t for t in spaces.values()))}
    stated = "; ".join(f"{k} {s.value!r} ({s.source})" for k, s in run.fields.items()) or "nothing"
    logger.info("training transform: %s%s", stated,
                f"; not stated by the run: {', '.join(run.unknown())}" if run.unknown() else "")
    if spaces and run.unknown():
        logger.info("the run does not state its %s; the index's %s is assumed", ", ".join(run.unknown()),
                    "; ".join(f"{n}: {t}" for n, t in spaces.items()))
    if store is not None:
        store.set_meta("training_transform", record)
    return record
