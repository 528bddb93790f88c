"""A realistic summary + gallery for the report renderer tests, with hostile strings planted in every
field that comes from data (captions, file names, run names, identities, space names)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from memtrack.detectors.metrics import wilson_interval

# If any of these ran, window.__pwned would be set (or an alert would open).
XSS_CAPTION = "<script>window.__pwned=1</script>a photo of a cat"
XSS_FILE = '"><img src=x onerror="window.__pwned=2;alert(1)">.png'
XSS_RUN = "run-<svg onload=window.__pwned=3>"
XSS_IDENTITY = "<iframe src=javascript:window.__pwned=4>"
XSS_SPACE = "clip<style>body{display:none}</style>"
STEPS = list(range(500, 8001, 500))


def png(seed: int, size: int = 32, noise: float = 0.0) -> bytes:
    """A small deterministic image: coloured stripes and a disc, optionally with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.1, 0.9, 3)
    img = np.stack([base[c] + 0.3 * np.sin((xx * (c + 2) + yy * seed % 5) * 6.28) for c in range(3)], -1)
    img[((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.06] = rng.uniform(0, 1, 3)
    img = img + rng.normal(0, noise, img.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _block(count: int, n: int, rng) -> dict:
    lo, hi = wilson_interval(count, n)
    return {"rate": count / n, "ci_low": lo, "ci_high": hi, "count": count, "n": n,
            "mean": float(rng.uniform(0.3, 0.6)), "p50": float(rng.uniform(0.3, 0.6)),
            "p95": float(rng.uniform(0.6, 0.9)), "distinct": max(0, count // 2)}


def make_summary(run: str = XSS_RUN, *, shift: int = 0, seed: int = 0, with_identities: bool = True,
                 with_trajectories: bool = True, n: int = 64) -> dict:
    """Near-copies start after step 4,000 (+shift), identity leakage at 6,000; clip_copy from step 2,000."""
    rng = np.random.default_rng(seed)
    cps = []
    for step in STEPS:
        copies = 0 if step <= 4000 + shift else int(2 + (step - 4000 - shift) / 250)
        metrics = {"nn_ratio": _block(min(copies, n), n, rng),
                   "tiled_l2": _block(min(max(0, copies - 3), n), n, rng)}
        if step >= 2000:
            metrics["clip_copy"] = _block(int(rng.integers(0, 2)), n, rng)
        if with_identities:
            metrics["identity_leak"] = _block(0 if step < 6000 else (step - 5500) // 500, n, rng)
        metrics["distinct_train_images"] = {"count": copies // 2}
        cps.append({"step": step, "checkpoint": f"checkpoint-{step}", "n_samples": n, "weights": "unet_ema",
                    "path": f"/runs/x/checkpoint-{step}", "duration_s": 7.0 + step / 10000,
                    "timings": {"sampling": 5.0, "pixel": 0.01, "clip": 1.5 + step / 10000, "detectors": 0.02},
                    "metrics": metrics, "distinct_train_images": copies // 2,
                    "top_matches": [{"seed": 17, "train_id": XSS_FILE, "detector": "nn_ratio", "score": 0.12,
                                     "threshold": 1 / 3, "direction": "below"}] if copies else []})
    onset_step = next(s for s in STEPS if s > 4000 + shift)
    summary = {
        "memtrack_version": "0.1.0", "generated_at": "2025-01-02T03:04:05+00:00", "run": run,
        "model": {"kind": "unconditional", "path": "/models/<b>ddpm</b>", "resolution": 32},
        "dataset": {"root": "/data/faces & <cats>", "n_train": 500, "n_skipped": 2, "layout": "imagefolder"},
        "index": {"path": "/runs/x/memtrack/index", "n_train": 500, "spaces": {
            "pixel": {"name": "pixel", "metric": "l2", "dim": 3072, "index_type": "flat", "recall_at_k": 1.0,
                      "resolution": 32, "n_vectors": 500},
            XSS_SPACE: {"name": "ViT-B-32/laion2b", "metric": "cosine", "dim": 512, "index_type": "flat",
                        "recall_at_k": None, "fingerprint": "clip:9f8e7d"}}},
        "baseline": {"pixel": {"n": 500, "mean": 0.21, "p50": 0.2, "p75": 0.24, "p90": 0.28, "p95": 0.3, "p99": 0.35,
                               "values": rng.gamma(9, 0.023, 500).tolist()},
                     XSS_SPACE: {"n": 500, "mean": 0.7, "p50": 0.71, "p75": 0.76, "p90": 0.8, "p95": 0.83, "p99": 0.9}},
        "thresholds": {"nn_ratio": {"value": 1 / 3, "source": "default", "direction": "below",
                                    "citation": "Gu et al. 2023"},
                       "tiled_l2": {"value": 0.15, "source": "calibrated", "direction": "below",
                                    "citation": "Carlini et al. 2023"},
                       "clip_copy": {"value": 0.5, "source": "default", "direction": "above",
                                     "citation": "Somepalli et al. 2023"}},
        "checkpoints": cps,
        "onset": {"nn_ratio": {"step": onset_step, "between": [onset_step - 500, onset_step]},
                  "tiled_l2": {"step": onset_step + 1000, "between": [onset_step + 500, onset_step + 1000]},
                  "clip_copy": {"step": None, "between": None}},
        "recommended_checkpoint": {"step": onset_step - 500, "reason": "last checkpoint before any onset"},
        "skipped": [{"step": 250, "checkpoint": "checkpoint-250", "reason": "half-written: <no unet>"}],
        "onset_rule": {"baseline_rate": 0.01, "persistence": 2, "interval": "95% Wilson lower bound"},
        "sampling": {"num_samples": n, "seed": 0, "num_inference_steps": 50, "scheduler": "ddim"},
        "changes": {"since": "2025-01-01T03:00:00+00:00", "new_checkpoints": [7500, 8000],
                    "new_onsets": ["identity_leak"]},
    }
    if with_identities:
        summary["thresholds"]["identity_leak"] = {"value": 0.6, "source": "calibrated", "direction": "below",
                                                  "citation": "dlib face_recognition, FAR 0.1%"}
        summary["onset"]["identity_leak"] = {"step": 6000, "between": [5500, 6000]}
        summary["identities"] = {
            "leaked": [{"identity": XSS_IDENTITY, "first_step": 6000, "count": 3},
                       {"identity": "person_007", "first_step": 6500, "count": 2},
                       {"identity": "person_042", "first_step": 7000, "count": 1}],
            "calibration": {"threshold": 0.6, "source": "calibrated", "far": 0.001,
                            "genuine": rng.normal(0.38, 0.08, 200).tolist(),
                            "impostor": rng.normal(0.82, 0.09, 2000).tolist()}}
    if with_trajectories:
        seeds = list(range(24))
        matches, locked = [], []
        for s in seeds:
            lock = STEPS[int(rng.integers(7, 16))] if s % 3 == 0 else None
            tid = [XSS_FILE, "cat_0003.png", "dog_0117.png", "car_0042.png", "face_0310.png"][s % 5]
            row = [tid if lock is not None and st >= lock else ("tmp_%d.png" % st if rng.random() < 0.04 else None)
                   for st in STEPS]
            matches.append(row)
            locked.append(lock)
        summary["trajectories"] = {"steps": STEPS, "seeds": seeds, "matches": matches, "locked_step": locked}
    return summary


def make_gallery() -> list[dict]:
    items = []
    for i in range(4):
        items.append({"step": 8000 - 500 * i, "seed": 17 + i, "detector": "nn_ratio", "score": 0.05 + 0.05 * i,
                      "threshold": 1 / 3, "direction": "below", "sample_png": png(i, noise=0.04),
                      "train_png": png(i), "train_id": XSS_FILE if i == 0 else f"train/img_{i:04d}.png",
                      "caption": XSS_CAPTION if i == 0 else None, "identity": None, "blend": None})
    items.append({"step": 8000, "seed": 30, "detector": "clip_copy", "score": 0.93, "threshold": 0.5,
                  "direction": "above", "sample_png": png(9, 64, 0.1), "train_png": None,
                  "train_id": "missing.png", "caption": "a red car", "identity": None, "blend": None})
    items.append({"step": 7000, "seed": 5, "detector": "identity_leak", "score": 0.41, "threshold": 0.6,
                  "direction": "below", "sample_png": png(21, noise=0.05), "train_png": png(21),
                  "train_id": "faces/p7.jpg", "caption": None, "identity": XSS_IDENTITY, "blend": None})
    items.append({"step": 7500, "seed": 9, "detector": "identity_interpolation", "score": 0.52, "threshold": 0.6,
                  "direction": "below", "sample_png": png(31, noise=0.05), "train_png": None,
                  "train_id": "faces/p1.jpg", "caption": None, "identity": None,
                  "blend": {"a_png": png(32), "b_png": png(33), "a": XSS_IDENTITY, "b": "person_042"}})
    return items
