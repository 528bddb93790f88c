"""Scans, onsets, galleries and gates on models that do memorize (tests/memorizing.py).

The copycat's rates are known before the scan: on :data:`conftest.COPYCAT_SCHEDULE` the nn_ratio and
nn_ratio_dedup counts are 0, 0, 4, 8, 8 of 16, the copies are exact or noised at sigma 0.01 (alternating), and
copy ``i`` reproduces the ``i % 6``-th training image. Everything below checks memtrack against that.
The really trained model (``memorized``) is checked end to end through the CLI.
"""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from conftest import COPYCAT_SCHEDULE
from memorizing import CopycatPipeline, training_images, write_copycat_run
from memtrack.cli.main import main
from memtrack.store.run_store import RunStore
from memtrack.scan.tracker import png_bytes

N = 16
STEPS = sorted(COPYCAT_SCHEDULE)
POSITIVE = ("nn_ratio", "nn_ratio_dedup")  # stable on distinct images; tiled_l2 and adaptive_l2 are out of their regime on 16-px images and six images


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _latest(run):
    with RunStore.open(run, create=False, readonly=True) as store:
        return [(e, store.samples(e.id)) for e in store.evaluations()]


# ------------------------------------------------------------------------------------------ the copycat


def test_copycat_is_deterministic_seed_respecting_and_copies_what_it_says(train_dir):
    train = training_images(train_dir)
    cat = CopycatPipeline(train, copies=4, kinds=("exact", "noise", "flip", "crop"), sigma=0.01)
    batch = cat(batch_size=6, generator=_gens(range(6))).images
    alone = [cat(batch_size=1, generator=_gens([s])).images[0] for s in range(6)]
    assert [np.asarray(a).tobytes() for a in batch] == [np.asarray(b).tobytes() for b in alone]
    arrays = [np.asarray(im, np.float64) / 255 for im in batch]
    src = [np.asarray(im, np.float64) / 255 for _, im in train]
    assert np.array_equal(arrays[0], src[0])                                   # exact
    assert 0.005 < np.sqrt(((arrays[1] - src[1]) ** 2).mean()) < 0.015         # noised at sigma 0.01
    assert np.array_equal(arrays[2], src[2][:, ::-1])                          # mirrored
    assert arrays[3].shape == src[3].shape and not np.array_equal(arrays[3], src[3])  # cropped, resized back
    assert [cat.source(i) for i in (0, 3, 4)] == [("exact", train[0][0]), ("crop", train[3][0]), None]
    assert not np.array_equal(arrays[4], arrays[5])                            # fresh samples differ by seed
    assert all(np.sqrt(((arrays[4] - s) ** 2).mean()) > 0.2 for s in src)     # and resemble no training image


def test_scan_of_the_copycat_flags_exactly_the_copies(copycat_scanned, train_dir, pixel_index):
    from memtrack.index.reference import ReferenceIndex

    names = [n for n, _ in training_images(train_dir)]
    row_ids = ReferenceIndex.open(pixel_index).train_ids  # a match is the record row of the index
    latest = _latest(copycat_scanned)
    assert [e.step for e, _ in latest] == STEPS
    for ev, samples in latest:
        copies = COPYCAT_SCHEDULE[ev.step]
        for det in POSITIVE:
            m = ev.metrics[det]
            assert (m["count"], m["n"]) == (copies, N), (ev.step, det, m)
            assert m["rate"] == copies / N
            flagged = [s["sample"] for s in samples if s["flags"][det]]
            assert flagged == list(range(copies)), (ev.step, det)
            matched = [row_ids[s["matches"][det]] for s in samples[:copies]]
            assert matched == [names[i % len(names)] for i in range(copies)], (ev.step, det)
        assert ev.metrics["nn_ratio"]["distinct"] == min(copies, len(names))
        # an exact copy sits at distance exactly 0; a sigma-0.01 copy near 0.01
        d1 = [s["scores"]["nn_ratio.d1"] for s in samples[:copies]]
        assert all(d == 0.0 for d in d1[0::2]) and all(0.004 < d < 0.02 for d in d1[1::2])
        assert all(s["scores"]["nn_ratio"] > 0.6 for s in samples[copies:])    # fresh: d1/d2 near 1


def test_onset_and_recommended_checkpoint_of_the_copycat(copycat_scanned, capsys):
    assert main(["report", str(copycat_scanned), "--format", "json", "--quiet"]) == 0
    summary = json.loads((copycat_scanned / "memtrack" / "summary.json").read_text())
    for det in POSITIVE:
        assert summary["onset"][det] == {"step": 300, "between": [200, 300], "confirmed": True,
                                       "provisional": None}, det
    assert summary["recommended_checkpoint"]["step"] == 200
    assert [c["metrics"]["nn_ratio"]["count"] for c in summary["checkpoints"]] == [0, 0, 4, 8, 8]
    assert [c["distinct_train_images"] for c in summary["checkpoints"]] == [0, 0, 4, 6, 6]


def test_a_rise_that_falls_back_is_no_onset(tmp_path, train_dir, pixel_index):
    from memorizing import scan_copycat

    run = write_copycat_run(tmp_path / "spike", {100: 0, 200: 8, 300: 0, 400: 0}, train_dir)
    scan_copycat(run, pixel_index, num_samples=N)
    assert main(["report", str(run), "--format", "json", "--quiet"]) == 0
    summary = json.loads((run / "memtrack" / "summary.json").read_text())
    assert [c["metrics"]["nn_ratio"]["count"] for c in summary["checkpoints"]] == [0, 8, 0, 0]
    assert summary["onset"]["nn_ratio"]["step"] is None
    assert main(["report", str(run), "--quiet", "--fail-on", "nn_ratio.onset != null"]) == 0


def _cards(html: str) -> list[dict]:
    """Each match card of the report: its two embedded PNGs (generated, training), training id and seed."""
    out = []
    for body in html.split('<figure class="card">')[1:]:
        pngs = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', body)]
        tid = re.search(r"training: <code>(.*?)</code>", body)
        seed = re.search(r", seed (\d+)</p>", body)
        if tid and seed and len(pngs) >= 2:
            out.append({"sample": pngs[0], "train": pngs[1], "train_id": tid.group(1), "seed": int(seed.group(1))})
    return out


def test_gallery_shows_each_flagged_copy_beside_the_training_image_it_copies(copycat_scanned, train_dir, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(copycat_scanned), "--out", str(out), "--quiet"]) == 0
    html = out.read_text()
    train = dict(training_images(train_dir))
    names = sorted(train)
    cards = _cards(html)
    assert len(cards) >= 4, html[:2000]
    last = COPYCAT_SCHEDULE[STEPS[-1]]
    for card in cards:
        assert card["seed"] < last                                     # only copies are shown, never noise
        assert card["train_id"] == names[card["seed"] % len(names)]   # beside the image that seed copies
        assert card["train"] == png_bytes(train[card["train_id"]], 128)
        if card["seed"] % 2 == 0:                                      # exact copies: the very same pixels
            assert card["sample"] == card["train"]
    assert {c["train_id"] for c in cards} >= set(names[:4])


def test_gates_on_known_rates(copycat_scanned, capsys):
    run = str(copycat_scanned)
    # the latest checkpoint: 8/16 flagged by nn_ratio, onset at step 300
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.rate > 0.5"]) == 0
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.count < 8"]) == 0
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.onset == null"]) == 0
    capsys.readouterr()
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.rate >= 0.5"]) == 1
    assert "gate tripped: nn_ratio.rate >= 0.5 (observed 0.5)" in capsys.readouterr().err
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio_dedup.onset <= 300"]) == 1
    assert "gate tripped: nn_ratio_dedup.onset <= 300 (observed 300)" in capsys.readouterr().err
    assert main(["report", run, "--quiet", "--fail-on", "nn_ratio.distinct > 5"]) == 1
    assert "(observed 6)" in capsys.readouterr().err


def test_another_copycat_schedule_is_another_checkpoint(tmp_path, train_dir):
    from memtrack.sampling.checkpoints import discover

    a = discover(write_copycat_run(tmp_path / "a", {10: 0}, train_dir))[0]
    b = discover(write_copycat_run(tmp_path / "b", {10: 3}, train_dir))[0]
    assert (a.weights / "copycat.json").is_file() and a.fingerprint() != b.fingerprint()
    weights = "diffusion_pytorch_model.safetensors"  # other schedules, other weights too
    assert (a.weights / weights).read_bytes() != (b.weights / weights).read_bytes()
    assert CopycatPipeline.for_checkpoint(b).copies == 3


# ---------------------------------------------------------------------------------- a really trained model


@pytest.mark.timeout(300)
def test_a_trained_memorizing_model_is_caught_by_scan_report_and_gates(memorized, tmp_path, capsys):
    run, index = str(memorized.run), str(memorized.index)
    assert main(["scan", run, "--index", index, "--num-samples", str(N), "--steps", "20"]) == 0
    out = tmp_path / "report.html"
    capsys.readouterr()
    assert main(["report", run, "--out", str(out), "--quiet", "--fail-on", "nn_ratio.onset != null"]) == 1
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    cps = summary["checkpoints"]
    first, last = cps[0]["metrics"]["nn_ratio"], cps[-1]["metrics"]["nn_ratio"]
    assert cps[0]["step"] == 100 and first["count"] == 0          # untrained: nothing is a near-copy
    assert last["count"] >= 3 and last["rate"] < 0.99               # trained: several samples are copies
    onset = summary["onset"]["nn_ratio"]["step"]
    assert onset is not None and 100 < onset <= cps[-1]["step"]
    assert f"gate tripped: nn_ratio.onset != null (observed {onset})" in err
    cards = _cards(out.read_text())
    names = {p.name for p in memorized.data.glob("*.png")}
    assert cards and {c["train_id"] for c in cards} <= names
    assert main(["report", run, "--out", str(out), "--quiet", "--fail-on", "nn_ratio.rate > 0.99"]) == 0


# ------------------------------------------------------------------------------ the CLI on copycat runs


def test_memtrack_scan_of_a_copycat_run_through_the_cli(copycat_run, pixel_index, copycat_sampling, capsys):
    assert main(["scan", str(copycat_run), "--index", str(pixel_index), "--num-samples", str(N), "--steps", "1",
                 "--json"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [ln["step"] for ln in lines] == STEPS
    assert [ln["metrics"]["nn_ratio"]["count"] for ln in lines] == [COPYCAT_SCHEDULE[s] for s in STEPS]
    assert [ln["metrics"]["nn_ratio_dedup"]["count"] for ln in lines] == [COPYCAT_SCHEDULE[s] for s in STEPS]


@pytest.mark.timeout(240)
def test_launch_stops_training_when_the_copy_rate_crosses_a_stop_on_gate(tmp_path, train_dir, pixel_index,
                                                                        copycat_sampling):
    import signal
    import sys
    from pathlib import Path

    from memtrack.integrations.launch import launch

    template = write_copycat_run(tmp_path / "template", {100: 0, 200: 0, 300: 4, 400: 8, 500: 8}, train_dir)
    out = tmp_path / "run"
    script = Path(__file__).parent / "scripts" / "copy_checkpoints.py"
    cmd = [sys.executable, str(script), "--source", str(template), "--output_dir", str(out), "--interval", "0.5",
           "--linger", "120"]
    over = {"sampling.num_samples": N, "sampling.num_inference_steps": 1, "tracking.quiet_period_s": 0.2,
            "tracking.poll_interval_s": 0.1}
    res = launch(cmd, index=pixel_index, overrides=over, stop_on=["nn_ratio.rate >= 0.25"])
    assert res.exit_code == 1 and res.gate == "nn_ratio.rate >= 0.25 (observed 0.25)"
    assert res.training_code == -signal.SIGTERM                 # stopped, not left to linger for two minutes
    evaluated = [(r.checkpoint, r.metrics["nn_ratio"]["count"]) for r in res.results]
    assert evaluated == [("checkpoint-100", 0), ("checkpoint-200", 0), ("checkpoint-300", 4)]
