"""Wrapping training: sidecar and in-process tracking of a real (tiny) training script, on CPU.

``tests/scripts/train_tiny.py`` mirrors diffusers' train_unconditional.py (Accelerator + ProjectConfiguration,
save hooks, ``checkpoint-N`` via save_state, ``--checkpoints_total_limit`` pruning, ``--use_ema``, a final
pipeline). It runs through ``memtrack launch`` in both modes with one and two processes. Two CPU processes
need ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true`` (accelerate's
``--cpu`` flag alone starts a single process unless MPI is set up). Text-to-image, DreamBooth and LoRA
checkpoints use tiny random components saved to a local "base model" folder. Nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_checkpoint
from memtrack.cli.main import main as cli_main
from memtrack.config import load_config
from memtrack.store.run_store import RunStore

HERE = Path(__file__).parent
TRAIN = HERE / "scripts" / "train_tiny.py"
EVAL_DIST = HERE / "scripts" / "eval_distributed.py"
REPO = HERE.parent
PY = sys.executable
ACCELERATE = str(Path(PY).parent / "accelerate")

pytestmark = pytest.mark.timeout(300)

CONFIG = """\
sampling: {num_samples: 4, batch_size: 4, num_inference_steps: 2}
tracking: {quiet_period_s: 0.2, poll_interval_s: 0.1}
"""


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for key, value in {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                       "MEMTRACK_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "memtrack.yaml"
    path.write_text(CONFIG)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training(out: Path, data: Path, processes: int = 1, *extra: str) -> list[str]:
    script = [str(TRAIN), "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", "6",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--use_ema", *extra]
    if processes == 1:
        return [PY, *script]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *script]


def rows(run: Path) -> list[tuple]:
    with RunStore.open(run, create=False, readonly=True) as store:
        evals = store.evaluations(status=None, latest_per_checkpoint=False)
    return [(e.checkpoint, e.status, e.weights) for e in evals]


def assert_each_once(run: Path, names=("checkpoint-2", "checkpoint-4", "checkpoint-6"), status=None) -> None:
    got = rows(run)
    listed = [r[0] for r in got]
    assert sorted(set(listed)) == sorted(listed), f"a checkpoint was evaluated twice: {got}"
    for name in names:
        assert name in listed, f"{name} missing from {got}"
    if status:
        assert {r[1] for r in got if r[0] in names} == {status}, got


def scalars(log_root: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for folder in {p.parent for p in log_root.rglob("events.out.tfevents.*")}:
        ea = EventAccumulator(str(folder))
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            out += [(e.step, e.value) for e in ea.Scalars(tag)]
    return sorted(out)


def launch(*args: str) -> int:
    return cli_main(["launch", *args])


# ------------------------------------------------------------------------------------- pure parts


def test_training_command_flags_overrides_and_in_process_rewrite(tmp_path):
    from memtrack.errors import ConfigError
    from memtrack.integrations.launch import INPROCESS_MODULE, TrainingCommand

    cmd = TrainingCommand.parse(["--", "accelerate", "launch", "--num_processes", "2", "train.py",
                                 "--output_dir=runs/x", "--pretrained_model_name_or_path", "base/",
                                 "--resolution", "64", "--instance_prompt", "a sks dog"])
    assert cmd.output_dir == Path("runs/x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampling: {resolution: 32}\n")
    assert cmd.overrides(cfg) == {"sampling.pretrained_model": "base/", "sampling.instance_prompt": "a sks dog"}
    assert cmd.overrides(None)["sampling.resolution"] == 64
    assert cmd.in_process()[:6] == ["accelerate", "launch", "--num_processes", "2", "-m", INPROCESS_MODULE]
    assert TrainingCommand.parse(["python", "-u", "t.py", "--output_dir", "o"]).in_process() == [
        "python", "-u", "-m", INPROCESS_MODULE, "t.py", "--output_dir", "o"]
    assert TrainingCommand.parse(["python", "-m", "pkg.train", "--output_dir", "o"]).in_process() == [
        "python", "-m", INPROCESS_MODULE, "--module", "pkg.train", "--output_dir", "o"]
    with pytest.raises(ConfigError, match="--output_dir"):
        _ = TrainingCommand.parse(["python", "t.py"]).output_dir


@pytest.mark.parametrize("name", ["unconditional", "text_to_image", "dreambooth", "lora"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.tracking.in_process in ("deferred", "rank0")


# --------------------------------------------------------------------------------- sidecar pieces


def _tracker(index, run, **over):
    from memtrack.scan.tracker import Tracker

    cfg = load_config(None, {"sampling.num_samples": 4, "sampling.num_inference_steps": 2,
                             "tracking.quiet_period_s": 60.0, **over})
    return Tracker.from_config(cfg, index=index, run_dir=run)


def test_vanished_checkpoint_is_skipped_once(tmp_path, pixel_index):
    from memtrack.integrations.watch import Watcher

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    tracker = _tracker(pixel_index, run)
    watcher = Watcher(tracker, run, sink=None)
    watcher.scan_once()                     # seen, still inside its quiet period
    assert watcher.drain() == []
    shutil.rmtree(run / "checkpoint-10")    # --checkpoints_total_limit got there first
    for _ in range(3):
        watcher.scan_once()
        watcher.drain()
    tracker.close()
    assert rows(run) == [("checkpoint-10", "skipped", None)]
    with RunStore.open(run, create=False, readonly=True) as store:
        assert "vanished" in store.evaluations(status="skipped")[0].reason


def test_staged_checkpoint_survives_deletion_and_bad_ones_are_skipped(tmp_path, pixel_index):
    from memtrack.integrations.watch import Watcher

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0, ema=True)
    write_checkpoint(run, 20, seed=1, complete=False)    # training died while saving
    (run / "checkpoint-30").mkdir()                      # unknown layout
    (run / "checkpoint-30" / "random_states_0.pkl").write_bytes(b"x")
    tracker = _tracker(pixel_index, run, **{"tracking.quiet_period_s": 0.0})
    watcher = Watcher(tracker, run, sink=None)
    watcher.scan_once()
    shutil.rmtree(run / "checkpoint-10")                 # deleted after staging: still evaluated
    watcher.drain()
    watcher.finish()
    watcher.finish()                                     # idempotent
    tracker.close()
    got = {name: (status, weights) for name, status, weights in rows(run)}
    assert got == {"checkpoint-10": ("done", "unet_ema"), "checkpoint-20": ("skipped", None),
                   "checkpoint-30": ("skipped", None)}
    assert not any((run / "memtrack" / "staging").iterdir())


class CopyPipeline:
    """Returns training images: every sample is a copy, so the match grid has rows."""

    def __init__(self, images):
        self.images = images

    def __call__(self, batch_size=1, generator=None, **kwargs):
        from types import SimpleNamespace

        n = len(generator) if isinstance(generator, list) else batch_size
        return SimpleNamespace(images=[self.images[i % len(self.images)] for i in range(n)])


def test_match_grid_and_tensorboard_sink(tmp_path, pixel_index, train_dir):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from memtrack.integrations.logging import TensorBoardSink, match_grid

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    tracker = _tracker(pixel_index, run)
    ck = __import__("memtrack.sampling.checkpoints", fromlist=["discover"]).discover(run)[0]
    copies = [Image.open(p).convert("RGB") for p in sorted(train_dir.glob("*.png"))]
    result = tracker.evaluate(ck, pipeline=CopyPipeline(copies))
    assert result.metrics["nn_ratio"]["rate"] == 1.0
    grid = match_grid(tracker, ck, result)
    assert grid is not None and grid.shape[1] == 128 and grid.shape[0] % 64 == 0 and grid.shape[2] == 3
    (run / "logs" / "train_tiny").mkdir(parents=True)
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(str(run / "logs" / "train_tiny")).close()   # the script's own event file
    sink = TensorBoardSink.for_run(run)
    sink.log(result, grid)
    sink.close()
    tracker.close()
    assert sink.log_dir == run / "logs" / "train_tiny"
    ea = EventAccumulator(str(sink.log_dir))
    ea.Reload()
    assert [e.step for e in ea.Scalars("memtrack/nn_ratio")] == [10]
    assert "memtrack/strongest_matches" in ea.Tags()["images"]

    # in-process: the script's own accelerate trackers get the rates and the grid
    from types import SimpleNamespace

    from accelerate.tracking import TensorBoardTracker

    from memtrack.integrations.logging import log_to_accelerator

    tb = TensorBoardTracker("script", tmp_path / "acc-logs")
    tb.start()
    logged = []
    acc = SimpleNamespace(is_main_process=True, trackers=[tb],
                          log=lambda values, step: (logged.append((step, values)), tb.log(values, step=step)))
    log_to_accelerator(acc, result, grid)
    tb.finish()
    assert logged[0][0] == 10 and logged[0][1]["memtrack/nn_ratio"] == 1.0
    ea = EventAccumulator(str(tmp_path / "acc-logs" / "script"))
    ea.Reload()
    assert "memtrack/strongest_matches" in ea.Tags()["images"] and "memtrack/nn_ratio_dedup" in ea.Tags()["scalars"]
    # tiled_l2 is not applicable on this 16-px index (4-px tiles): it has no rate, so nothing is logged for it
    assert "memtrack/tiled_l2" not in ea.Tags()["scalars"]


def test_prompt_sources(tmp_path, pixel_index):
    from memtrack.errors import ConfigError
    from memtrack.index.reference import ReferenceIndex
    from memtrack.sampling.text_to_image import is_text_to_image, resolve_prompts

    ref = ReferenceIndex.open(pixel_index)
    cfg = load_config(None).sampling
    assert not is_text_to_image(cfg)                       # no base model: unconditional, no prompts
    ref.records[2].caption = ref.records[4].caption        # a duplicated caption comes first
    assert resolve_prompts(cfg, ref)[0] == ref.records[4].caption
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red car\n\na blue boat\n")
    cfg = load_config(None, {"sampling.prompts": "file", "sampling.prompt_file": str(prompts)}).sampling
    assert is_text_to_image(cfg) and resolve_prompts(cfg) == ["a red car", "a blue boat"]
    with pytest.raises(ConfigError, match="instance_prompt"):
        resolve_prompts(load_config(None, {"sampling.prompts": "instance"}).sampling)
    with pytest.raises(ConfigError, match="captions"):
        resolve_prompts(load_config(None).sampling, None)


def test_tracker_step_follows_the_cadence(tmp_path, pixel_index):
    from memtrack.sampling.unconditional import load_unet

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    tracker = _tracker(pixel_index, run, **{"tracking.every_n_steps": 5})
    unet = load_unet(run / "checkpoint-10" / "unet")
    unet.train()
    assert tracker.step(3, unet=unet) is None
    res = tracker.step(5, unet=unet)
    assert res is not None and res.checkpoint == "step-5" and res.n_samples == 4
    assert tracker.step(5, unet=unet) is None          # not twice for the same step
    assert unet.training                                # put back in the mode it was in
    tracker.close()


def test_watch_once_cli_and_stop_on_gate(tmp_path, pixel_index, train_dir, copycat_scanned, capsys):
    from memtrack.integrations.launch import _ending, _tripped

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=0)
    write_checkpoint(run, 20, seed=1)
    assert cli_main(["watch", str(run), "--index", str(pixel_index), "--once", "--num-samples", "4",
                     "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["checkpoint"] for r in out["results"]] == ["checkpoint-10", "checkpoint-20"]
    assert cli_main(["watch", str(run), "--index", str(pixel_index), "--once", "--num-samples", "4",
                     "--steps", "2"]) == 0                      # again: nothing evaluated twice
    assert "stored earlier" in capsys.readouterr().out
    assert len(rows(run)) == 2

    # the stop-on check on a store whose latest checkpoint has 8/16 near-copies (onset at step 300)
    with RunStore.open(copycat_scanned) as store:
        assert _tripped(store, copycat_scanned, ["nn_ratio.rate >= 0.5"]) == "nn_ratio.rate >= 0.5 (observed 0.5)"
        assert _tripped(store, copycat_scanned, ["nn_ratio.rate > 0.5", "nn_ratio_dedup.onset == null"]) is None
        assert _tripped(store, copycat_scanned, ["nn_ratio.rate > 0.5", "nn_ratio_dedup.onset >= 300"]) == \
            "nn_ratio_dedup.onset >= 300 (observed 300)"
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    ended = _ending(sleeper, ["nn_ratio.rate >= 0 (observed 0.0)"], None, [])
    assert ended.exit_code == 1 and ended.gate and sleeper.returncode == -15


def test_save_state_hook_strategies_without_collectives(tmp_path, pixel_index, config_file):
    from types import SimpleNamespace

    from memtrack.integrations.hooks import SaveStateHook
    from memtrack.integrations.inprocess import TrackingOptions, make_factory

    run = tmp_path / "run"
    for step in (2, 4):
        write_checkpoint(run, step, seed=step)
    built = []

    def build(acc):
        built.append(acc)
        return make_factory(TrackingOptions(str(pixel_index), str(config_file), output_dir=str(run)))(acc)

    two_ranks = SimpleNamespace(is_main_process=True, num_processes=2, process_index=0, device="cpu", trackers=[])
    rank0 = SaveStateHook(build, strategy="rank0")
    rank0.after_save(two_ranks, run / "checkpoint-2")    # evaluated at once, alone: no collective at all
    assert [r.checkpoint for r in rank0.results] == ["checkpoint-2"] and built == [None]
    rank0.sync(two_ranks)                                 # rank0 never syncs
    deferred = SaveStateHook(build)
    deferred.after_save(two_ranks, run / "checkpoint-4")  # noted, evaluated at the next sync point
    assert deferred.pending == [(4, str(run / "checkpoint-4"))] and not deferred.results
    deferred.after_save(two_ranks, run / "not-a-checkpoint")
    assert len(deferred.pending) == 1
    results = deferred.finalize()                         # what no sync point reached, then the sweep
    assert [r.checkpoint for r in results][:1] == ["checkpoint-4"] and not deferred.pending
    for hook in (rank0, deferred):
        hook.close()
    assert_each_once(run, names=("checkpoint-2", "checkpoint-4"), status="done")
    with pytest.raises(ValueError, match="strategy"):
        SaveStateHook(build, strategy="later")


# ------------------------------------------------------------------------------ end to end, launch


def test_sidecar_one_process_total_limit_ema_and_tensorboard(tmp_path, pixel_index, train_dir, config_file):
    out = tmp_path / "run"
    code = launch("--index", str(pixel_index), "--config", str(config_file), "--",
                  *training(out, train_dir, 1, "--step_sleep", "0.5"))
    assert code == 0
    assert not (out / "checkpoint-2").exists()         # pruned by --checkpoints_total_limit ...
    assert_each_once(out, status="done")                # ... but staged in time and evaluated
    assert {w for _, s, w in rows(out) if s == "done"} <= {"unet_ema", "final"}
    steps = [s for s, _ in scalars(out / "logs", "memtrack/nn_ratio")]
    assert {2, 4, 6} <= set(steps) and len(steps) == len(set(steps))
    assert scalars(out / "logs", "loss")                # the script's own curve sits in the same folder


def test_in_process_one_process(tmp_path, pixel_index, train_dir, config_file):
    out = tmp_path / "run"
    code = launch("--in-process", "--index", str(pixel_index), "--config", str(config_file), "--",
                  *training(out, train_dir, 1))
    assert code == 0
    assert_each_once(out, status="done")
    assert [s for s, _ in scalars(out / "logs", "memtrack/nn_ratio")][:3] == [2, 4, 6]


def test_sidecar_two_processes(tmp_path, pixel_index, train_dir, config_file):
    out = tmp_path / "run"
    code = launch("--index", str(pixel_index), "--config", str(config_file), "--",
                  *training(out, train_dir, 2, "--step_sleep", "0.5"))
    assert code == 0
    assert_each_once(out)


def test_in_process_two_processes_share_sampling(tmp_path, pixel_index, train_dir, config_file, monkeypatch, capfd):
    from memtrack.sampling.checkpoints import discover
    from memtrack.scan.tracker import Tracker

    monkeypatch.setenv("MEMTRACK_VERBOSITY", "info")
    out = tmp_path / "run"
    code = launch("--in-process", "--index", str(pixel_index), "--config", str(config_file), "--",
                  *training(out, train_dir, 2))
    assert code == 0
    assert "checkpoint-4 evaluated in-process across 2 processes" in capfd.readouterr().err
    assert_each_once(out, status="done")
    # one process, same plan, same checkpoints: the same samples and the same metrics
    single = Tracker.from_config(config_file, index=pixel_index, run_dir=out, store_dir=tmp_path / "single")
    with RunStore.open(out, create=False, readonly=True) as shared:
        stored = {e.checkpoint: e for e in shared.evaluations()}
        for ck in discover(out, include_final=False):
            single.evaluate(ck)
            a, b = stored[ck.name], single.store.find(ck.name, single.eval_key(ck))
            assert [s["sha256"] for s in shared.samples(a.id)] == [s["sha256"] for s in single.store.samples(b.id)]
            assert shared.metrics(a.id) == single.store.metrics(b.id)
    single.close()


@pytest.mark.parametrize("in_process", [False, True], ids=["sidecar", "in-process"])
def test_crashing_script_exit_code_and_what_exists_is_evaluated(tmp_path, pixel_index, train_dir, config_file,
                                                                in_process):
    out = tmp_path / "run"
    flags = ["--in-process"] if in_process else []
    code = launch(*flags, "--index", str(pixel_index), "--config", str(config_file), "--",
                  *training(out, train_dir, 1, "--crash_at_step", "5", "--crash_exit_code", "7"))
    assert code == 7
    assert_each_once(out, names=("checkpoint-2", "checkpoint-4"), status="done")
    assert not (out / "model_index.json").exists()


def test_distributed_sampling_one_and_two_processes_identical(tmp_path, pixel_index, config_file):
    from memtrack.sampling.checkpoints import discover
    from memtrack.scan.tracker import Tracker

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=4)
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(EVAL_DIST), "--run", str(run), "--index", str(pixel_index), "--store", str(tmp_path / "two"),
           "--config", str(config_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert two["processes"] == 2 and two["off_cadence"]

    one = Tracker.from_config(config_file, index=pixel_index, run_dir=run, store_dir=tmp_path / "one",
                              overrides={"tracking.every_n_steps": 5})
    ck = discover(run, include_final=False)[0]
    one.evaluate(ck)
    from memtrack.sampling.unconditional import load_unet

    one.step(10, unet=load_unet(ck.weights))
    with RunStore.open(run, folder=tmp_path / "two", create=False, readonly=True) as shared:
        for name in ("checkpoint-10", "step-10"):
            a = next(e for e in shared.evaluations() if e.checkpoint == name)
            b = next(e for e in one.store.evaluations() if e.checkpoint == name)
            assert [s["sha256"] for s in shared.samples(a.id)] == [s["sha256"] for s in one.store.samples(b.id)]
            assert shared.metrics(a.id) == one.store.metrics(b.id)
            assert len(shared.samples(a.id)) == 4
    one.close()


# ----------------------------------------------------------------------- text-to-image, DreamBooth, LoRA


from tiny_models import tiny_cond_unet, write_tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("base") / "tiny-sd")


T2I = {"sampling.num_samples": 4, "sampling.num_inference_steps": 2, "sampling.resolution": 16,
       "sampling.guidance_scale": 2.0, "sampling.seeds_per_prompt": 2}


def _t2i_tracker(index, run, base, store_dir=None, **over):
    from memtrack.scan.tracker import Tracker

    return Tracker.from_config(None, index=index, run_dir=run, store_dir=store_dir,
                               overrides={**T2I, "sampling.pretrained_model": str(base), **over})


def _hashes(tracker, ck) -> list[str]:
    ev = tracker.store.find(ck.name, tracker.eval_key(ck))
    return [s["sha256"] for s in tracker.store.samples(ev.id)]


def _trained_text_encoder(base: Path):
    """The base's text encoder with its weights moved (seeded): what DreamBooth's --train_text_encoder saves."""
    import torch
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return encoder


def test_text_to_image_and_dreambooth_checkpoints(tmp_path, pixel_index, tiny_sd):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from memtrack.sampling.checkpoints import discover

    run = tmp_path / "run"
    ck_dir = run / "checkpoint-5"
    tiny_cond_unet(1).save_pretrained(ck_dir / "unet")
    _trained_text_encoder(tiny_sd).save_pretrained(ck_dir / "text_encoder")  # DreamBooth trained it too
    (ck_dir / "random_states_0.pkl").write_bytes(b"x")
    StableDiffusionPipeline.from_pretrained(tiny_sd).save_pretrained(run)  # the final pipeline = the base
    cks = discover(run)
    assert [(c.name, c.kind) for c in cks] == [("checkpoint-5", "t2i_unet"), ("final", "t2i_pipeline")]
    assert cks[0].text_encoder is not None

    tracker = _t2i_tracker(pixel_index, run, tiny_sd)
    captions = [r.caption for r in tracker.index.records]
    assert tracker.plan.prompts == captions              # training captions by default (all unique here)
    results = [tracker.evaluate(ck) for ck in cks]
    assert [r.skipped for r in results] == [False, False] and results[0].n_samples == 4
    samples = tracker.store.samples(tracker.store.find("checkpoint-5", tracker.eval_key(cks[0])).id)
    assert [s["prompt"] for s in samples] == [captions[0]] * 2 + [captions[1]] * 2
    assert _hashes(tracker, cks[0]) != _hashes(tracker, cks[1])   # the checkpoint's own UNet was used
    trained = _hashes(tracker, cks[0])
    # the text encoder saved with the checkpoint is the one that samples: memtrack's pipeline holds its weights
    from memtrack.sampling.registry import load_pipeline

    saved = CLIPTextModel.from_pretrained(ck_dir / "text_encoder").state_dict()
    used = load_pipeline(cks[0], tracker.config.sampling, run).text_encoder.state_dict()
    assert saved.keys() == used.keys() and all(torch.equal(saved[k], used[k]) for k in saved)
    tracker.close()
    # ... and it shows in the samples: the same UNet with the base's text encoder (saved in the checkpoint
    # or not) draws other images, and the two base-encoder checkpoints draw the same ones
    twin = tmp_path / "twin"
    base_encoder = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder")
    for name, encoder in (("checkpoint-5", None), ("checkpoint-6", base_encoder)):
        tiny_cond_unet(1).save_pretrained(twin / name / "unet")
        if encoder is not None:
            encoder.save_pretrained(twin / name / "text_encoder")
        (twin / name / "random_states_0.pkl").write_bytes(b"x")
    tw = _t2i_tracker(pixel_index, twin, tiny_sd, store_dir=tmp_path / "twin-db")
    twin_cks = discover(twin, include_final=False)
    assert [c.text_encoder is not None for c in twin_cks] == [False, True]
    assert [tw.evaluate(c).skipped for c in twin_cks] == [False, False]
    without, with_base = (_hashes(tw, c) for c in twin_cks)
    tw.close()
    assert without == with_base and trained != without

    db = _t2i_tracker(pixel_index, run, tiny_sd, store_dir=tmp_path / "db", **{
        "sampling.prompts": "instance", "sampling.instance_prompt": "a photo of sks dog"})
    assert db.plan.prompts == ["a photo of sks dog"]
    assert not db.evaluate(cks[0]).skipped
    assert {s["prompt"] for s in db.store.samples(db.store.find("checkpoint-5", db.eval_key(cks[0])).id)} == {
        "a photo of sks dog"}
    db.close()


def test_lora_checkpoint_loads_on_the_base_and_unloads(tmp_path, pixel_index, tiny_sd):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from memtrack.sampling.checkpoints import discover

    run = tmp_path / "run"
    unet = tiny_cond_unet(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    for step in (10, 20, 40):
        StableDiffusionPipeline.save_lora_weights(run / f"checkpoint-{step}", unet_lora_layers=layers,
                                                  safe_serialization=True)
        (run / f"checkpoint-{step}" / "random_states_0.pkl").write_bytes(b"x")
    (run / "checkpoint-20" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    tiny_cond_unet(3).save_pretrained(run / "checkpoint-30" / "unet")
    (run / "checkpoint-30" / "random_states_0.pkl").write_bytes(b"x")
    StableDiffusionPipeline.from_pretrained(tiny_sd).save_pretrained(run / "base-copy")

    cks = {c.name: c for c in discover(run, include_final=False)}
    assert cks["checkpoint-10"].kind == "lora"
    tracker = _t2i_tracker(pixel_index, run, tiny_sd)
    for name in ("checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"):
        tracker.evaluate(cks[name])
    with RunStore.open(run, create=False, readonly=True) as store:
        skipped = store.evaluations(status="skipped")
    assert [e.checkpoint for e in skipped] == ["checkpoint-20"] and "LoRA" in skipped[0].reason
    first = _hashes(tracker, cks["checkpoint-10"])
    assert _hashes(tracker, cks["checkpoint-40"]) == first   # same LoRA after another checkpoint: unloaded
    base = load_config(None, {**T2I}).sampling
    from memtrack.sampling.checkpoints import inspect
    from memtrack.sampling.registry import sample

    plain = sample(inspect(run / "base-copy", 0, "final"), tracker.plan, base)
    assert plain.hashes() != first                        # the LoRA changed the samples
    tracker.close()
