"""Find the checkpoints of a diffusers training run and say what each holds, in step order.

diffusers' example scripts save ``<output_dir>/checkpoint-<step>/`` through ``accelerator.save_state``,
whose save hook writes ``unet/`` (and ``unet_ema/`` with ``--use_ema``, ``text_encoder/`` when DreamBooth
trains it) with ``save_pretrained``; LoRA scripts write ``pytorch_lora_weights.safetensors``. accelerate
writes ``random_states_<rank>.pkl`` last, which is how a checkpoint is known to be complete. At the end the
scripts save a whole pipeline (``model_index.json``) or LoRA weights into ``output_dir`` itself.

Nothing here loads weights: it only reads names, sizes and modification times.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from memtrack.errors import CheckpointError
from memtrack.utils import get_logger, stable_hash

logger = get_logger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: ``weights_name`` of an in-memory model evaluated by ``Tracker.step`` (stored as ``step-N``).
LIVE = "live"

Kind = Literal["unet", "lora", "pipeline", "t2i_unet", "t2i_pipeline"]
#: ``_class_name`` values (in ``unet/config.json``) of text-conditional UNets: their checkpoints get the
#: ``t2i_`` kinds, whose pipeline builders live in :mod:`memtrack.sampling.text_to_image`.
CONDITIONAL_UNETS = ("UNet2DConditionModel",)


@dataclass
class Checkpoint:
    """One evaluable state of a run.

    Attributes:
        step: the global step (the ``N`` of ``checkpoint-N``; the final pipeline takes the last step).
        path: the checkpoint folder (or the run folder for the final pipeline).
        name: ``checkpoint-N`` or ``final``.
        kind: ``unet`` (a ``unet/``/``unet_ema/`` folder), ``lora`` (LoRA weights) or ``pipeline``;
            ``t2i_unet`` / ``t2i_pipeline`` when the UNet is text-conditional (``UNet2DConditionModel``).
        weights: the folder or file whose weights are evaluated (``unet_ema`` preferred when asked).
        weights_name: ``unet``, ``unet_ema``, ``lora`` or ``final``.
        text_encoder: a ``text_encoder/`` folder saved with the checkpoint, if any.
        complete: accelerate finished writing it (``random_states_0.pkl`` present) -- always True for
            folders that accelerate did not write (the final pipeline).
        content: a hash of the weights' content when it is known without files (in-memory models of
            ``Tracker.step``, :func:`memtrack.sampling.text_to_image.live_checkpoint`); then it is the fingerprint.
    """

    step: int
    path: Path
    name: str
    kind: Kind
    weights: Path
    weights_name: str
    text_encoder: Optional[Path] = None
    complete: bool = True
    files: list = field(default_factory=list)
    content: Optional[str] = None

    @property
    def live(self) -> bool:
        """An in-memory model (``Tracker.step``), not a folder on disk."""
        return self.weights_name == LIVE

    def fingerprint(self) -> str:
        """The identity of the weights: their content hash when known (live models), else a cheap one --
        names, sizes and modification times of the weight files and configs (rewriting a file changes it)."""
        if self.content:
            return self.content
        parts = []
        for f in sorted(self.files):
            try:
                st = os.stat(f)
            except OSError:
                continue
            parts.append((os.path.relpath(f, self.path), st.st_size, st.st_mtime_ns))
        return stable_hash(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "files"}


def _weight_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".json")):
            out.append(p)
    return out


def _has_model(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and any(
        p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def _is_conditional(model_dir: Path) -> bool:
    """True when ``model_dir/config.json`` names a text-conditional UNet class."""
    import json

    try:
        return json.loads((model_dir / "config.json").read_text()).get("_class_name") in CONDITIONAL_UNETS
    except (OSError, ValueError, AttributeError):
        return False


def inspect(folder: Path, step: int, name: str, prefer_ema: bool = True) -> Checkpoint | None:
    """Describe one checkpoint folder, or None when it holds no layout memtrack knows."""
    text_encoder = folder / "text_encoder" if _has_model(folder / "text_encoder") else None
    complete = (folder / "random_states_0.pkl").is_file() if name != "final" else True
    candidates = ["unet_ema", "unet"] if prefer_ema else ["unet", "unet_ema"]
    for sub in candidates:
        if _has_model(folder / sub):
            files = _weight_files(folder / sub) + (_weight_files(text_encoder) if text_encoder else [])
            kind: Kind = "pipeline" if (folder / "model_index.json").is_file() else "unet"
            if _is_conditional(folder / sub):
                kind = "t2i_pipeline" if kind == "pipeline" else "t2i_unet"
            return Checkpoint(step, folder, name, kind, folder / sub, sub if name != "final" else "final",
                              text_encoder, complete, files)
    if (folder / LORA_FILE).is_file():
        return Checkpoint(step, folder, name, "lora", folder / LORA_FILE, "lora", text_encoder, complete,
                          [folder / LORA_FILE])
    return None


def discover(run_dir: str | Path, *, prefer_ema: bool = True, include_final: bool = True,
             include_incomplete: bool = False) -> list[Checkpoint]:
    """The run's checkpoints in step order.

    Args:
        run_dir: the training script's ``--output_dir``.
        prefer_ema: evaluate ``unet_ema/`` when a checkpoint has it.
        include_final: add the final pipeline / LoRA weights saved in ``run_dir`` itself. It gets the last
            checkpoint's step and replaces that checkpoint when its weights are the same state; otherwise
            its step is one past the last checkpoint (the scripts do not record the final step).
        include_incomplete: also list checkpoints accelerate has not finished writing.

    Raises:
        CheckpointError: ``run_dir`` is missing, or holds no checkpoint memtrack can evaluate.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}",
                              hint="pass the training script's --output_dir")
    found: list[Checkpoint] = []
    unknown: list[str] = []
    for entry in sorted(run_dir.iterdir()):
        m = _CKPT.match(entry.name)
        if not (m and entry.is_dir()):
            continue
        ck = inspect(entry, int(m.group(1)), entry.name, prefer_ema)
        if ck is None:
            unknown.append(entry.name)
            continue
        if ck.complete or include_incomplete:
            found.append(ck)
    found.sort(key=lambda c: c.step)
    if include_final:
        final = inspect(run_dir, found[-1].step if found else 0, "final", prefer_ema)
        if final is not None:
            if found and _same_weights(found[-1], final):
                logger.info("the final pipeline in %s holds the same weights as %s", run_dir, found[-1].name)
            else:
                final.step = (found[-1].step + 1) if found else 0
                found.append(final)
    if unknown:
        logger.warning("skipping %d checkpoint folder(s) with no unet/, unet_ema/ or LoRA weights: %s",
                       len(unknown), ", ".join(unknown[:5]))
    if not found:
        raise CheckpointError(f"no checkpoints found in {run_dir}",
                              hint="memtrack looks for checkpoint-<step>/unet (or unet_ema/, "
                                   f"{LORA_FILE}) and a final pipeline saved in the run folder")
    return found


def _same_weights(a: Checkpoint, b: Checkpoint) -> bool:
    """True when two checkpoints hold byte-identical weight files (sizes first, then sha256)."""
    from memtrack.utils import sha256_file

    fa = [f for f in a.files if f.suffix in WEIGHT_SUFFIXES]
    fb = [f for f in b.files if f.suffix in WEIGHT_SUFFIXES]
    if len(fa) != len(fb) or not fa:
        return False
    try:
        if sorted(f.stat().st_size for f in fa) != sorted(f.stat().st_size for f in fb):
            return False
        return sorted(sha256_file(f) for f in fa) == sorted(sha256_file(f) for f in fb)
    except OSError:
        return False
