"""Faces embedded per second: memtrack's FaceEmbedder vs the bare dlib calls, same images, same run.

The bare loop is what a dlib user writes: ``detector(img, upsample)``, ``shape_predictor(img, box)``,
``compute_face_descriptor(img, shape)`` per face. memtrack adds score ordering, box filtering, explicit
chips (``get_face_chip``) and batched descriptors. Models are loaded before timing; each path runs
``--repeats`` times, alternating, and the fastest run of each is reported. The last line is one JSON object.

    python benchmarks/face_throughput.py --images 24 --upsample 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def real_faces(n: int) -> list:
    """The astronaut and Grace Hopper, with deterministic crops / rotations / flips / brightness up to n."""
    import matplotlib.cbook as cbook
    import skimage.data

    base = [Image.fromarray(skimage.data.astronaut()),
            Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")]
    out = []
    for i in range(n):
        im = base[i % 2]
        w, h = im.size
        k = i // 2
        im = im.crop((k % 4 * w // 40, k % 3 * h // 40, w - k % 5 * w // 40, h - k % 2 * h // 40))
        im = im.rotate((k % 7 - 3) * 2.0, resample=Image.Resampling.BICUBIC)
        im = ImageEnhance.Brightness(im).enhance(0.8 + 0.1 * (k % 5))
        out.append(ImageOps.mirror(im) if k % 2 else im)
    return out


def bare_dlib(arrays: list, models: tuple, upsample: int) -> np.ndarray:
    detector, predictor, net = models
    vecs = []
    for a in arrays:
        for box in detector(a, upsample):
            vecs.append(np.asarray(net.compute_face_descriptor(a, predictor(a, box))))
    return np.asarray(vecs, dtype=np.float32).reshape(-1, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--upsample", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import dlib

    from memtrack.embedders.face import FaceEmbedder, FaceOptions, dlib_model_dir

    images = real_faces(args.images)
    arrays = [np.ascontiguousarray(np.asarray(im)) for im in images]
    folder = dlib_model_dir()
    models = (dlib.get_frontal_face_detector(),
              dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat")),
              dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat")))
    face = FaceEmbedder(FaceOptions(upsample=args.upsample, batch_size=args.batch_size))
    face.embed_faces(images[:1])  # load and warm up both paths
    bare_dlib(arrays[:1], models, args.upsample)

    best = {"bare": float("inf"), "memtrack": float("inf"), "detect_align": float("inf"), "embed": float("inf")}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = bare_dlib(arrays, models, args.upsample)
        best["bare"] = min(best["bare"], time.perf_counter() - t)
        t = time.perf_counter()
        batch = face.embed_faces(images)
        best["memtrack"] = min(best["memtrack"], time.perf_counter() - t)
        t = time.perf_counter()
        aligned = face.detect_and_align(images)
        t2 = time.perf_counter()
        face.embed_chips(aligned.chips)
        best["detect_align"] = min(best["detect_align"], t2 - t)
        best["embed"] = min(best["embed"], time.perf_counter() - t2)

    n_bare, n_mt = len(ref), len(batch.vectors)
    same = n_bare == n_mt
    # faces come out in a different order (memtrack sorts by score); compare as sets of nearest matches
    diff = float(np.abs(np.sort(ref, 0) - np.sort(batch.vectors, 0)).max()) if same and n_mt else float("nan")
    fps_bare, fps_mt = n_bare / best["bare"], n_mt / best["memtrack"]
    print(f"images {len(images)} (astronaut / Hopper augmentations, {images[0].size[0]}-{images[1].size[1]} px), "
          f"upsample {args.upsample}, threads {os.cpu_count()}")
    print(f"bare dlib : {n_bare} faces in {best['bare']:.2f} s = {fps_bare:.1f} faces/s")
    print(f"memtrack  : {n_mt} faces in {best['memtrack']:.2f} s = {fps_mt:.1f} faces/s "
          f"(detect+align {best['detect_align']:.2f} s, embed {best['embed']:.2f} s)")
    print(f"ratio memtrack / bare = {fps_mt / fps_bare:.3f}; max |vector difference| = {diff:.2e}")
    print(json.dumps({"benchmark": "face_throughput", "images": len(images), "faces": n_mt, "same_faces": same,
                      "bare_faces_per_s": round(fps_bare, 2), "memtrack_faces_per_s": round(fps_mt, 2),
                      "ratio": round(fps_mt / fps_bare, 3), "detect_align_s": round(best["detect_align"], 3),
                      "embed_s": round(best["embed"], 3), "max_abs_diff": diff, "upsample": args.upsample,
                      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
