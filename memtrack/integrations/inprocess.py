"""Run an unmodified training script with memtrack inside it: ``accelerate launch -m memtrack.integrations.inprocess``.

Every process of the launch runs this module, which installs :class:`~memtrack.integrations.hooks.SaveStateHook`
(wrapping ``Accelerator.save_state``; see that module for why nothing deadlocks) and then runs the script as
``__main__`` with its own arguments, exactly as ``python script.py`` would. When the script returns, the
main process evaluates the final pipeline it saved and anything no sync point reached.

Options come from the ``MEMTRACK_INPROCESS`` environment variable (JSON, set by ``memtrack launch
--in-process``) or from flags placed before the script::

    accelerate launch --num_processes 2 -m memtrack.integrations.inprocess --index ref/ \\
        --config configs/unconditional.yaml train_unconditional.py --output_dir runs/ddpm ...
    accelerate launch -m memtrack.integrations.inprocess --index ref/ --module mypkg.train --lr 1e-4

The sampling device defaults to the process's own accelerator device (each rank samples on its GPU).
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from memtrack.integrations.options import ENV, TrackingOptions, make_factory, parse_args, script_flag  # noqa: F401


def run(argv: list[str]) -> int:
    """Install the hook, run the script as ``__main__``, finalize on the main process; the script's code."""
    from memtrack.config import load_config
    from memtrack.integrations.hooks import SaveStateHook

    from memtrack.index.reference import ReferenceIndex
    from memtrack.integrations.transform import verify_run_transform

    opts, script_argv, module = parse_args(argv)
    cfg = load_config(opts.config, opts.overrides)  # 1. fail before training: config, index, transform
    strategy = cfg.tracking.in_process
    verify_run_transform(ReferenceIndex.open(opts.index), cfg, opts.output_dir, command=script_argv)
    hook = SaveStateHook(make_factory(opts), run_dir=opts.output_dir, strategy=strategy).install()
    code = 0
    sys.argv = list(script_argv)
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script = Path(script_argv[0])
            sys.path[0] = str(script.resolve().parent)  # as `python script.py` sets it
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            raise
    hook.finalize()
    hook.close()
    return code


def main() -> None:  # pragma: no cover - exercised through subprocesses
    from memtrack.errors import MemtrackError

    try:
        sys.exit(run(sys.argv[1:]))
    except MemtrackError as exc:
        if os.environ.get("MEMTRACK_DEBUG"):
            raise
        print(f"memtrack: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
