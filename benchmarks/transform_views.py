"""Do the detectors see the copies a training transform lets a model reproduce? With and without views.

A small training set of real photographs (scikit-image / matplotlib samples, non-square, written at start)
is indexed twice in the pixel space: as memtrack used to (one centre view per image) and following the
training transform (``--random_flip``: the mirrored view too; ``crop: random``: every crop offset). The
"generated" samples are exact copies a memorizing model trained with that transform can emit: the mirrored
training view, and random crops at offsets other than the centre. For each index the script prints what
nn_ratio, tiled_l2 and adaptive_l2 score on them and how many each flags. The last line is one JSON object.

    python benchmarks/transform_views.py [--resolution 32] [--train-resolution 64] [--crops 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import real_image  # noqa: E402

from memtrack.config import Config, EmbedderSpec  # noqa: E402
from memtrack.data.dataset import open_image, read_dataset  # noqa: E402
from memtrack.embedders.registry import get_embedder  # noqa: E402
from memtrack.index.reference import ReferenceIndex  # noqa: E402
from memtrack.scan.tracker import Tracker  # noqa: E402

PHOTOS = [("coffee", 1.5), ("chelsea", 0.66), ("rocket", 1.4), ("astronaut", 1.6), ("grace_hopper", 0.7),
          ("coins", 1.3), ("camera", 0.75), ("hubble_deep_field", 1.45)]


def training_set(folder: Path, r: int) -> Path:
    folder.mkdir(parents=True)
    for name, aspect in PHOTOS:
        w, h = (int(r * 2 * aspect), r * 2) if aspect >= 1 else (r * 2, int(r * 2 / aspect))
        real_image(name).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{name}.png")
    return folder


def copies(data: Path, emb, crops: int) -> dict:
    """Mirrored centre views, and crops at ``crops`` offsets spread along the long side (no centre)."""
    out = {"mirrored": [], "cropped": []}
    r = emb.train_resolution  # a generated sample has the training resolution
    for path in sorted(data.glob("*.png")):
        big = emb.resized(open_image(path, alpha="drop"))
        w, h = big.size
        top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))  # torchvision's CenterCrop
        out["mirrored"].append(ImageOps.mirror(big.crop((left, top, left + r, top + r))))
        for o in np.linspace(0, max(w, h) - r, crops).round().astype(int):
            top, left = (0, o) if w >= h else (o, 0)
            out["cropped"].append(big.crop((left, top, left + r, top + r)))
    return out


def scores(data: Path, out: Path, pixel: dict, samples: list) -> dict:
    cfg = Config()
    cfg.index.embedders = [EmbedderSpec("pixel", pixel)]
    cfg.detectors.calibrate = False
    ref = ReferenceIndex.build(read_dataset(data, show_progress=False), [get_embedder({"name": "pixel", **pixel})],
                               out, cfg)
    res = {}
    for o in Tracker(ref, [get_embedder({"name": "pixel", **pixel})], cfg).assess(samples):
        if o.name in ("nn_ratio", "tiled_l2", "adaptive_l2"):
            res[o.name] = {"median": round(float(np.median(o.score)), 3), "flagged": int(o.flagged.sum()),
                           "n": len(o.score)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--train-resolution", type=int, default=None,
                   help="training resolution (default: --resolution); larger: views are reduced to --resolution")
    p.add_argument("--crops", type=int, default=3)
    args = p.parse_args()
    r = args.resolution
    base = {"resolution": r, "train_resolution": args.train_resolution or r}
    with tempfile.TemporaryDirectory() as tmp:
        data = training_set(Path(tmp) / "data", base["train_resolution"])
        cases = {"mirrored": ({"flip": True}, {}), "cropped": ({"crop": "random"}, {})}
        result = {**base, "n_train": len(PHOTOS)}
        for case, (following, _) in cases.items():
            samples = copies(data, get_embedder({"name": "pixel", **base, **following}), args.crops)[case]
            for label, pixel in (("one centre view", base), ("follows the transform", {**base, **following})):
                got = scores(data, Path(tmp) / f"{case}-{label}".replace(" ", "_"), pixel, samples)
                result[f"{case} copies, index with {label}"] = got
                print(f"{case:>8} copies ({len(samples)}), index with {label:<22}: " + "  ".join(
                    f"{k} median {v['median']} flagged {v['flagged']}/{v['n']}" for k, v in got.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
