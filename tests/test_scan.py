"""scan / check end to end on tiny real models and real files, through the CLI and the library."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import write_checkpoint
from memtrack.sampling.checkpoints import discover
from memtrack.cli.main import main
from memtrack.config import Config
from memtrack.sampling.unconditional import SamplePlan
from memtrack.sampling.registry import load_pipeline, sample
from memtrack.store.run_store import RunStore
from memtrack.scan.tracker import Tracker

FAST = ["--num-samples", "6", "--steps", "2"]


def _scan(run, index, *extra):
    return main(["scan", str(run), "--index", str(index), *FAST, *extra])


def test_scan_stores_every_checkpoint_once_and_resumes(tiny_run, pixel_index, capsys):
    assert _scan(tiny_run, pixel_index) == 0
    store = RunStore.open(tiny_run, create=False)
    evs = store.evaluations()
    assert [e.step for e in evs] == [10, 20, 30]
    assert all(e.n_samples == 6 and e.status == "done" for e in evs)
    assert set(evs[0].metrics) >= {"nn_ratio", "tiled_l2", "adaptive_l2"}
    assert evs[0].metrics["nn_ratio"]["n"] == 6
    samples = store.samples(evs[0].id)
    assert [s["seed"] for s in samples] == list(range(6))
    assert all((store.folder / s["thumb"]).is_file() for s in samples)
    assert store.integrity_ok()
    for e in evs:  # where each evaluation's time went, stage by stage
        t = e.info["timings"]
        assert set(t) == {"sampling", "pixel", "detectors"} and all(v >= 0 for v in t.values())
        assert t["sampling"] > 0 and sum(t.values()) <= e.duration_s + 1e-3
    store.close()
    capsys.readouterr()
    # a second scan evaluates nothing again
    assert _scan(tiny_run, pixel_index) == 0
    assert capsys.readouterr().out.count("stored earlier") == 3
    store = RunStore.open(tiny_run, create=False)
    assert len(store.evaluations(latest_per_checkpoint=False)) == 3
    store.close()


def test_changed_weights_or_config_is_reevaluated(tiny_run, pixel_index, capsys):
    assert _scan(tiny_run, pixel_index) == 0
    capsys.readouterr()
    write_checkpoint(tiny_run, 20, seed=77)            # new weights under an old name
    assert _scan(tiny_run, pixel_index) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ["stored earlier" in ln for ln in lines[:3]] == [True, False, True]
    # a changed sampling config re-evaluates everything
    assert main(["scan", str(tiny_run), "--index", str(pixel_index), "--num-samples", "6", "--steps", "3"]) == 0
    store = RunStore.open(tiny_run, create=False)
    assert len(store.evaluations(latest_per_checkpoint=False)) == 3 + 1 + 3
    latest = store.evaluations()
    assert [e.step for e in latest] == [10, 20, 30]   # the report reads the newest of each
    assert all(e.id > 4 for e in latest)
    store.close()


def test_samples_do_not_depend_on_batch_size(tiny_run):
    ck = discover(tiny_run)[0]
    cfg = Config().sampling
    cfg.num_inference_steps = 2
    plan = SamplePlan(num_samples=5, seed=3)
    pipe = load_pipeline(ck, cfg, tiny_run)
    cfg.batch_size = 5
    a = sample(ck, plan, cfg, pipeline=pipe).hashes()
    cfg.batch_size = 2
    b = sample(ck, plan, cfg, pipeline=pipe).hashes()
    # the shards of two "processes", concatenated in global-index order
    shards = [sample(ck, plan, cfg, items=plan.shard(r, 2), pipeline=pipe).hashes() for r in range(2)]
    assert a == b == shards[0] + shards[1]
    assert len(set(a)) == 5


def test_plan_shards_cover_every_index_once():
    plan = SamplePlan(num_samples=11, seed=0)
    for world in (1, 2, 3, 4):
        got = [it.index for r in range(world) for it in plan.shard(r, world)]
        assert got == list(range(11))


def test_scan_refuses_an_index_built_with_another_embedder(tiny_run, pixel_index, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  embedders:\n    - name: pixel\n      resolution: 8\n")
    code = _scan(tiny_run, pixel_index, "--config", str(cfg))
    err = capsys.readouterr().err
    assert code == 2
    assert "differs from the one the index" in err and "resolution" in err
    assert not (tiny_run / "memtrack" / "store.sqlite").exists() or not RunStore.open(tiny_run).evaluations()


@pytest.mark.parametrize("problem", ["no_run", "no_index", "bad_config", "no_checkpoints"])
def test_bad_input_is_one_clear_sentence(problem, tiny_run, pixel_index, tmp_path, capsys):
    args = {"no_run": [str(tmp_path / "nope"), "--index", str(pixel_index)],
            "no_index": [str(tiny_run), "--index", str(tmp_path / "noindex")],
            "bad_config": [str(tiny_run), "--index", str(pixel_index), "--config", str(tmp_path / "bad.yaml")],
            "no_checkpoints": [str(tmp_path), "--index", str(pixel_index)]}[problem]
    (tmp_path / "bad.yaml").write_text("sampling:\n  num_sampels: 3\n")
    code = main(["scan", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("memtrack: error: ") and "Traceback" not in err
    expected = {"no_run": "run directory not found", "no_index": "no memtrack index",
                "bad_config": "unknown field 'num_sampels'", "no_checkpoints": "no checkpoints found"}[problem]
    assert expected in err


def test_check_json_on_copies_and_noise(pixel_index, train_dir, tmp_path, capsys):
    from PIL import Image

    imgs = tmp_path / "generated"
    imgs.mkdir()
    shutil.copy(train_dir / "coffee.png", imgs / "copy_of_coffee.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(imgs / "noise.png")
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["check", str(imgs), "--index", str(pixel_index), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_file = {i["file"]: i for i in out["images"]}
    assert set(by_file) == {"copy_of_coffee.png", "noise.png"}
    # a 16-px index of 6 images: tiled_l2 (4-px tiles) and adaptive_l2 (n = 50) are outside their regimes,
    # reported as not applicable with the reason -- never as a rate
    assert by_file["copy_of_coffee.png"]["flags"] == {"nn_ratio": True, "nn_ratio_dedup": True}
    assert out["rates"]["tiled_l2"]["applicable"] is False and "4 px" in out["rates"]["tiled_l2"]["reason"]
    assert out["rates"]["adaptive_l2"] == {"applicable": False, "reason": out["rates"]["adaptive_l2"]["reason"]}
    assert "this training set has 6" in out["rates"]["adaptive_l2"]["reason"]
    assert by_file["copy_of_coffee.png"]["matches"][0]["train_id"] == "coffee.png"
    assert by_file["copy_of_coffee.png"]["scores"]["nn_ratio.d1"] == 0.0
    assert not any(by_file["noise.png"]["flags"].values())
    assert out["rates"]["nn_ratio"]["count"] == 1 and out["rates"]["nn_ratio"]["n"] == 2
    assert set(out["rates"]["nn_ratio"]) >= {"rate", "ci_low", "ci_high", "count"}
    assert [s["path"] for s in out["skipped"]] == ["broken.jpg"]


def test_tracker_api_without_store(tiny_run, pixel_index):
    cfg = Config()
    cfg.sampling.num_samples, cfg.sampling.num_inference_steps = 4, 2
    tracker = Tracker.from_config(cfg, index=pixel_index, run_dir=None)
    res = tracker.evaluate(discover(tiny_run)[0])
    assert res.n_samples == 4 and not res.cached and res.metrics["nn_ratio"]["n"] == 4


def test_force_reevaluates_in_place(tiny_run, pixel_index):
    assert _scan(tiny_run, pixel_index) == 0
    assert _scan(tiny_run, pixel_index, "--force") == 0
    store = RunStore.open(tiny_run, create=False)
    assert len(store.evaluations(latest_per_checkpoint=False)) == 3  # replaced, not added
    assert store.integrity_ok()
    store.close()
