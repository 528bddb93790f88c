"""Training-set embedding throughput: memtrack's index-build path vs the bare model forward pass.

A folder of JPEG photos (crops of scikit-image's sample photographs, 384x384, written at start) is embedded
twice per embedder, in one run:

* **build path** -- what ``memtrack index build`` does: ``read_dataset`` (list, hash, check each file), then
  the embedding stage (read + decode in ``index.read_workers`` threads ahead of the model, the embedder's
  preprocessing, the forward pass). Throughput is reported for the embedding stage and end to end.
* **bare forward** -- the same images decoded and preprocessed beforehand, outside the timer; only the
  model's forward pass on the same batches is timed (CLIP: ``encode_image`` on the normalised tensors;
  pixel: the uint8 -> float vectors, which is all the pixel "model" does).

The goal is a ratio >= 0.9 for a real model (the input pipeline must not be the bottleneck). The pixel space
has no model to hide decoding behind, so its ratio shows what decoding costs per image. CLIP uses random
weights (``pretrained: null``): the same compute as ViT-B-32's real weights, nothing downloaded.
The last line printed is one JSON object.

    python benchmarks/embedding.py [--pixel-images 512] [--clip-images 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MEMTRACK_NO_PROGRESS", "1")
from memtrack.data.dataset import open_image, read_dataset  # noqa: E402
from memtrack.embedders.registry import get_embedder  # noqa: E402
from memtrack.embedders.pixel import pixels  # noqa: E402
from memtrack.index.shards import embed_records  # noqa: E402


def write_photos(folder: Path, n: int, size: int = 384) -> Path:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(skimage.data, s)()).convert("RGB").resize((512, 512))
              for s in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(0)
    for i in range(n):
        x, y = rng.integers(0, 512 - size, 2)
        photos[i % 4].crop((x, y, x + size, y + size)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def build_path(emb, folder: Path, batch: int, workers: int) -> dict:
    t0 = time.perf_counter()
    ds = read_dataset(folder, show_progress=False)
    t1 = time.perf_counter()
    vec, _, failed = embed_records(emb, ds.records, batch, 64_000_000, workers)
    t2 = time.perf_counter()
    assert not failed and len(vec) == len(ds.records)
    n = len(ds.records)
    return {"read_dataset_s": round(t1 - t0, 3), "embed_stage_s": round(t2 - t1, 3),
            "embed_stage_img_s": round(n / (t2 - t1), 1), "end_to_end_img_s": round(n / (t2 - t0), 1)}


def bare_clip(emb, folder: Path, batch: int) -> float:
    import torch

    model, pipeline = emb._build()
    images = [open_image(p) for p in sorted(folder.glob("*.jpg"))]
    batches = []
    for s in range(0, len(images), batch):
        items = [torch.from_numpy(np.asarray(pipeline.dataset(images[s:s + batch])[j]))
                 for j in range(len(images[s:s + batch]))]
        batches.append(pipeline.finish(torch.stack(items), emb._device))
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model.encode_image(b)
    return len(images) / (time.perf_counter() - t)


def bare_pixel(emb, folder: Path, batch: int) -> float:
    images = [open_image(p) for p in sorted(folder.glob("*.jpg"))]
    pre = [pixels(images[s:s + batch], emb.options.resolution) for s in range(0, len(images), batch)]
    t = time.perf_counter()
    for arr in pre:
        arr.reshape(len(arr), -1).astype(np.float32) / 255.0
    return len(images) / max(time.perf_counter() - t, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pixel-images", type=int, default=512)
    p.add_argument("--clip-images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    load0 = os.getloadavg()
    out = {"workers": args.workers, "batch": args.batch, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, spec, bare in (("pixel", args.pixel_images, {"name": "pixel", "resolution": 32}, bare_pixel),
                                    ("clip", args.clip_images, {"name": "clip", "model": "ViT-B-32",
                                                                "pretrained": None, "batch_size": args.batch},
                                     bare_clip)):
            folder = write_photos(Path(tmp) / name, n)
            emb = get_embedder(spec)
            emb.embed([open_image(next(folder.glob("*.jpg")))])  # build the model outside the timers
            res = build_path(emb, folder, args.batch, args.workers)
            res["bare_forward_img_s"] = round(bare(emb, folder, args.batch), 1)
            res["ratio_embed_stage"] = round(res["embed_stage_img_s"] / res["bare_forward_img_s"], 3)
            res["ratio_end_to_end"] = round(res["end_to_end_img_s"] / res["bare_forward_img_s"], 3)
            res["images"] = n
            out[name] = res
            print(f"{name}: build path {res['embed_stage_img_s']} img/s (end to end {res['end_to_end_img_s']}), "
                  f"bare forward {res['bare_forward_img_s']} img/s: ratio {res['ratio_embed_stage']} "
                  f"({res['ratio_end_to_end']} end to end)", flush=True)
    out["loadavg_before"] = [round(v, 2) for v in load0]
    out["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
