"""A stand-in training command that "saves" prepared checkpoints one by one (stdlib only, starts fast).

Each ``checkpoint-N`` folder of ``--source`` is copied into ``--output_dir`` in step order every
``--interval`` seconds, ``random_states_0.pkl`` last (accelerate writes it last). Afterwards the process
keeps "training" for ``--linger`` seconds, so a test can tell a stopped run from one that ended.
"""
from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--linger", type=float, default=60.0)
    args = p.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = sorted(Path(args.source).glob("checkpoint-*"), key=lambda d: int(re.sub(r"\D", "", d.name)))
    for ck in steps:
        time.sleep(args.interval)
        marker = ck / "random_states_0.pkl"
        shutil.copytree(ck, out / ck.name, ignore=shutil.ignore_patterns(marker.name))
        shutil.copy2(marker, out / ck.name / marker.name)
        print(f"saved {ck.name}", flush=True)
    time.sleep(args.linger)


if __name__ == "__main__":
    main()
