"""What ``memtrack launch --in-process`` hands every process of a launch: the tracking options (from the
``MEMTRACK_INPROCESS`` environment variable or flags before the script), the script's own flags, and the
tracker factory each process calls at its first checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from memtrack.errors import ConfigError

ENV = "MEMTRACK_INPROCESS"


@dataclass
class TrackingOptions:
    """What the in-process hook needs to build its tracker (serialised to :data:`ENV` by ``launch``)."""

    index: str
    config: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    store: Optional[str] = None
    output_dir: Optional[str] = None

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str) -> "TrackingOptions":
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{ENV} is not valid memtrack options: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memtrack.integrations.inprocess",
                                description="Run a training script with memtrack evaluating each checkpoint.")
    p.add_argument("--index", help="reference index folder")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--store", help="store folder (default OUTPUT_DIR/memtrack)")
    p.add_argument("--device", help="sampling device (default: each process's accelerator device)")
    p.add_argument("--num-samples", type=int, help="samples per checkpoint")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--strategy", choices=["deferred", "rank0"], help="tracking.in_process (see hooks.py)")
    p.add_argument("script", help="the training script, then its arguments")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def parse_args(argv: list[str]) -> tuple[TrackingOptions, list[str], Optional[str]]:
    """(options, the script's argv (argv[0] = script or module), module name or None)."""
    module = None
    if "--module" in argv:
        j = argv.index("--module")
        if j + 1 >= len(argv):
            raise ConfigError("--module needs a module name")
        module, own, script_argv = argv[j + 1], argv[:j], [argv[j + 1], *argv[j + 2:]]
        ns = _parser().parse_args([*own, "-"])
    else:
        ns = _parser().parse_args(argv)
        script_argv = [ns.script, *ns.args]
    opts = TrackingOptions.from_env(os.environ[ENV]) if os.environ.get(ENV) else TrackingOptions(index=ns.index)
    if ns.index:
        opts.index = ns.index
    if not opts.index:
        raise ConfigError("in-process tracking needs a reference index", hint="pass --index DIR before the script")
    opts.config = ns.config or opts.config
    opts.store = ns.store or opts.store
    for key, value in (("sampling.device", ns.device), ("sampling.num_samples", ns.num_samples),
                       ("sampling.num_inference_steps", ns.steps), ("tracking.in_process", ns.strategy)):
        if value is not None:
            opts.overrides[key] = value
    opts.output_dir = opts.output_dir or script_flag(script_argv, "--output_dir")
    return opts, script_argv, module


def script_flag(argv: list[str], name: str) -> Optional[str]:
    """The value of ``--name value`` / ``--name=value`` in ``argv`` (the last one wins, as argparse does)."""
    value = None
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith(name + "="):
            value = tok.split("=", 1)[1]
    return value


def make_factory(opts: TrackingOptions):
    """``build(accelerator_or_None) -> Tracker`` for :class:`SaveStateHook`."""
    from memtrack.config import load_config
    from memtrack.scan.tracker import Tracker

    def build(acc):
        overrides = dict(opts.overrides)
        if "sampling.device" not in overrides and acc is not None:
            overrides["sampling.device"] = str(acc.device)
        cfg = load_config(opts.config, overrides)
        return Tracker.from_config(cfg, index=opts.index, run_dir=opts.output_dir, accelerator=acc,
                                   store_dir=opts.store)
    return build
