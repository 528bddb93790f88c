"""wandb gets what tensorboard gets: the same scalars at the same steps, and the same match grid.

Offline only (``WANDB_MODE=offline``, files in a temp ``WANDB_DIR``): nothing here opens a connection.
The runs are read back from wandb's own files (:mod:`wandb_offline`): the ``.wandb`` datastore's history
records and the PNGs under ``files/media``. Every sample is a copy of a training image (a pipeline that
returns training images), so every checkpoint has a non-empty match grid.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_checkpoint
from memtrack.config import load_config
from memtrack.integrations.logging import GRID_TAG, match_grid, result_scalars
from wandb_offline import images, offline_runs, read_run, scalars

pytest.importorskip("wandb")
pytestmark = pytest.mark.timeout(180)

STEPS = (10, 20)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DIR": str(tmp_path / "wandb-files"), "MEMTRACK_NO_PROGRESS": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_RUN_ID", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "wandb-files").mkdir()
    return tmp_path / "wandb-files"


@pytest.fixture()
def copying(monkeypatch, train_dir):
    """Every checkpoint samples copies of the training images (so every result has matches and a grid)."""
    copies = [Image.open(p).convert("RGB") for p in sorted(train_dir.glob("*.png"))]

    class CopyPipeline:
        def __call__(self, batch_size=1, generator=None, **kwargs):
            from types import SimpleNamespace

            n = len(generator) if isinstance(generator, list) else batch_size
            return SimpleNamespace(images=[copies[i % len(copies)] for i in range(n)])

    monkeypatch.setattr("memtrack.scan.tracker.load_pipeline", lambda *a, **k: CopyPipeline())


def _config(**over):
    return load_config(None, {"sampling.num_samples": 4, "sampling.num_inference_steps": 2,
                              "tracking.quiet_period_s": 0.0, **over})


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "ddpm-1"
    for i, step in enumerate(STEPS):
        write_checkpoint(run, step, seed=i)
    return run


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _record_grids(monkeypatch, module: str) -> dict:
    """``{step: grid}`` of every match grid ``module`` builds (and then logs)."""
    built = {}

    def recording(tracker, ck, result, *args, **kwargs):
        grid = built[result.step] = match_grid(tracker, ck, result, *args, **kwargs)
        return grid

    monkeypatch.setattr(f"{module}.match_grid", recording)
    return built


def _check_grids(built: dict, logged: dict) -> None:
    assert sorted(logged) == sorted(built) == list(STEPS)
    for step in STEPS:
        (png,) = logged[step]
        grid = built[step]
        assert grid.shape[1] == 128 and grid.shape[0] >= 64 and grid.std() > 0     # rows of (sample | training image)
        assert np.array_equal(_png(png), grid)


def test_sidecar_logs_to_wandb_what_it_logs_to_tensorboard(tmp_path, pixel_index, copying, offline, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from memtrack.integrations.watch import Watcher
    from memtrack.scan.tracker import Tracker

    run = _run(tmp_path)
    cfg = _config(**{"tracking.loggers": ["tensorboard", "wandb"], "tracking.wandb_project": "train_unconditional"})
    tracker = Tracker.from_config(cfg, index=pixel_index, run_dir=run)
    built = _record_grids(monkeypatch, "memtrack.integrations.watch")
    results = Watcher(tracker, run).finish()       # the sidecar's own path: evaluate, log to every sink, close
    assert [r.step for r in results] == list(STEPS) and all(r.metrics["nn_ratio"]["rate"] == 1.0 for r in results)

    (folder,) = offline_runs(offline)
    got = read_run(folder)
    assert got["run"] == {"project": "train_unconditional", "group": "ddpm-1", "name": "ddpm-1-memtrack",
                          "job_type": "memtrack", "id": got["run"]["id"]} and got["run"]["id"].startswith("memtrack-")
    expected = {(r.step, k): v for r in results for k, v in result_scalars(r).items()}
    assert scalars(got["history"]) == expected

    ea = EventAccumulator(str(run / "logs" / "memtrack"))
    ea.Reload()
    board = {(e.step, tag): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    assert board.keys() == expected.keys()
    assert all(board[key] == pytest.approx(expected[key]) for key in board)   # tensorboard keeps float32

    tracker.close()
    _check_grids(built, images(folder, got["history"], GRID_TAG))
    tb_images = {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
                 for e in ea.Images(GRID_TAG)}
    assert sorted(tb_images) == list(STEPS) and all(np.array_equal(tb_images[s], built[s]) for s in STEPS)


def test_in_process_accelerator_wandb_gets_scalars_and_the_grid(tmp_path, pixel_index, copying, offline,
                                                                monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from memtrack.integrations.hooks import SaveStateHook
    from memtrack.integrations.inprocess import TrackingOptions, make_factory

    run = _run(tmp_path)
    built = _record_grids(monkeypatch, "memtrack.integrations.hooks")
    config = tmp_path / "memtrack.yaml"
    config.write_text("sampling: {num_samples: 4, num_inference_steps: 2}\n")
    acc = Accelerator(log_with="wandb", cpu=True)
    try:
        acc.init_trackers("train_tiny", init_kwargs={"wandb": {"dir": str(offline), "group": "g1"}})
        hook = SaveStateHook(make_factory(TrackingOptions(str(pixel_index), str(config), output_dir=str(run))),
                             run_dir=run)
        for step in STEPS:                         # what the wrapped save_state does after each save
            acc.log({"loss": 0.5 / step}, step=step)
            hook.after_save(acc, run / f"checkpoint-{step}")
        acc.end_training()
    finally:
        AcceleratorState._reset_state(True)
    results = hook.results
    hook.close()
    assert [r.step for r in results] == list(STEPS)

    (folder,) = offline_runs(offline)
    got = read_run(folder)
    assert got["run"]["project"] == "train_tiny" and got["run"]["group"] == "g1"
    expected = {(r.step, k): v for r in results for k, v in result_scalars(r).items()}
    assert scalars(got["history"]) == expected                    # next to the script's own loss:
    assert {row["_step"]: row["loss"] for row in got["history"] if "loss" in row} == {s: 0.5 / s for s in STEPS}

    _check_grids(built, images(folder, got["history"], GRID_TAG))


def test_wandb_sink_refuses_a_step_that_goes_back_and_unknown_loggers(tmp_path, offline):
    from types import SimpleNamespace

    from memtrack.errors import ConfigError
    from memtrack.integrations.wandb_sink import WandbSink

    sink = WandbSink.for_run(tmp_path / "run", _config().tracking)
    result = lambda step: SimpleNamespace(step=step, checkpoint=f"checkpoint-{step}", distinct_train_images=0,  # noqa: E731
                                          metrics={"nn_ratio": {"rate": step / 100}})
    for step in (20, 10, 30):                      # 10 would be dropped by wandb; memtrack says so and skips it
        sink.log(result(step))
    sink.close()
    (folder,) = offline_runs(offline)
    assert scalars(read_run(folder)["history"]) == {(20, "memtrack/nn_ratio"): 0.2, (20, "memtrack/distinct_train_images"): 0,
                                                    (30, "memtrack/nn_ratio"): 0.3, (30, "memtrack/distinct_train_images"): 0}
    with pytest.raises(ConfigError, match="unknown logger 'wandbb'"):
        _config(**{"tracking.loggers": ["wandbb"]})


def test_wandb_logger_without_wandb_names_the_extra(tmp_path, monkeypatch):
    from memtrack.errors import DependencyError
    from memtrack.integrations import wandb_sink
    from memtrack.integrations.logging import sinks_for_run

    monkeypatch.setattr(wandb_sink, "is_wandb_available", lambda: False)
    with pytest.raises(DependencyError, match="wandb is not installed") as err:
        sinks_for_run(tmp_path / "run", _config(**{"tracking.loggers": ["wandb"]}).tracking)
    assert "memtrack[wandb]" in err.value.hint
