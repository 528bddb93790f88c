"""Exercise every CUDA path memtrack has, with tiny random models, and print what ran, measured and failed.

Run through ``bash scripts/gpu_check.sh`` (it adds the time limit). Checks, in order:

* ``environment`` -- torch, CUDA, the GPUs, faiss's GPUs, onnxruntime's providers;
* ``sampling <device> <dtype>`` -- a tiny ``UNet2DModel`` checkpoint sampled through memtrack's own path
  (``memtrack.sampling.unconditional.sample``, CPU generator per seed) and evaluated (``Tracker.evaluate``), on the CPU
  (the reference), then ``cuda:0`` in float32, float16 and bfloat16: samples/s, and how far each GPU sample
  is from the CPU one (pixels, /255) -- same seeds, so they should be close;
* ``clip <device> <precision>`` -- a tiny random open_clip model through the ``clip`` embedder: images/s and
  the lowest cosine between the GPU and CPU embedding of the same image;
* ``text-to-image cuda:0`` -- a tiny Stable Diffusion base sampled through the text-to-image builder;
* ``faiss-gpu`` -- exact search on the GPU (``index_faiss.to_gpu``) against the same search on the CPU;
* ``arcface cuda`` -- a tiny ONNX model with ArcFace's interface on onnxruntime's CUDA provider vs its CPU;
* ``sidecar cuda:1`` -- the watcher with ``--device cuda:1`` in a child process: it must sample there and
  leave ``cuda:0`` untouched.

With no GPU it says ``no GPU``, runs the CPU references, marks the GPU checks skipped and exits 0. Exit 1 when
a check that ran failed. ``--json FILE`` writes the table as JSON too; ``--quick`` draws 4 samples of 2
steps instead of 16 of 10 (the test suite's CPU run). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # memtrack itself, and the tests' tiny-model writers

N_SAMPLES, DENOISE, RES = 16, 10, 32


@dataclass
class Row:
    check: str
    status: str  # ran | skipped | failed
    measurement: str = ""
    note: str = ""


class Skip(Exception):
    """A check that cannot run here (no GPU, a package missing); the message says why."""


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def need_gpus(n: int = 1) -> None:
    have = cuda_count()
    if have < n:
        raise Skip("no GPU" if have == 0 else f"{have} GPU(s); needs {n}")


def need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} not installed")


# ------------------------------------------------------------------------------------------- fixtures


class Context:
    """The tiny models and the CPU references, built once in a temp folder."""

    def __init__(self, work: Path):
        self.work = work
        self.cpu: dict = {}
        self.run, self.index = self._unconditional()

    def _unconditional(self):
        import skimage.data
        import torch
        from diffusers import UNet2DModel
        from PIL import Image

        from memtrack.config import Config, EmbedderSpec
        from memtrack.data.dataset import read_dataset
        from memtrack.embedders.registry import get_embedder
        from memtrack.index.reference import ReferenceIndex

        data = self.work / "data"
        data.mkdir()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
            im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            im.resize((RES, RES), Image.Resampling.BICUBIC).save(data / f"{name}.png")
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=RES, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        ck = self.work / "run" / "checkpoint-10"
        unet.save_pretrained(ck / "unet")
        (ck / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
        cfg = Config()
        cfg.index.embedders = [EmbedderSpec("pixel", {"resolution": RES})]
        ReferenceIndex.build(read_dataset(data), [get_embedder({"name": "pixel", "resolution": RES})],
                             self.work / "ref", cfg)
        return self.work / "run", self.work / "ref"


def _cfg(**over):
    from memtrack.config import load_config

    return load_config(None, {"sampling.num_samples": N_SAMPLES, "sampling.batch_size": N_SAMPLES,
                              "sampling.num_inference_steps": DENOISE, **over})


def _timed(fn, *args, **kwargs):
    fn(*args, **kwargs)  # warm-up: CUDA context, kernels, allocator
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


# --------------------------------------------------------------------------------------------- checks


def check_environment(ctx) -> Row:
    import torch

    n = cuda_count()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(n)) if n else "no GPU"
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        faiss_gpus = "faiss missing"
    try:
        import onnxruntime

        providers = ",".join(p.replace("ExecutionProvider", "") for p in onnxruntime.get_available_providers())
    except ImportError:
        providers = "onnxruntime missing"
    return Row("environment", "ran", f"torch {torch.__version__}, CUDA {torch.version.cuda}; {n} GPU(s): {gpus}",
               f"faiss GPUs: {faiss_gpus}; onnxruntime: {providers}")


def sampling(device: str, dtype: str):
    def check(ctx) -> Row:
        if device != "cpu":
            need_gpus(int(device.partition(":")[2] or 0) + 1)
        from memtrack.sampling.checkpoints import discover
        from memtrack.sampling.unconditional import SamplePlan, to_uint8
        from memtrack.sampling.registry import load_pipeline, sample
        from memtrack.scan.tracker import Tracker

        cfg = _cfg(**{"sampling.device": device, "sampling.dtype": dtype})
        (ck,) = discover(ctx.run, include_final=False)
        pipe = load_pipeline(ck, cfg.sampling, ctx.run)
        samples, dt = _timed(sample, ck, SamplePlan.from_config(cfg.sampling), cfg.sampling, ctx.run, pipeline=pipe)
        arrays = np.stack(to_uint8(samples.images)).astype(np.int16)
        tracker = Tracker.from_config(cfg, index=ctx.index, run_dir=ctx.run, store=False)
        result = tracker.evaluate(ck)
        rates = {k: m["rate"] for k, m in result.metrics.items() if "rate" in m}
        measured = f"{N_SAMPLES / dt:.1f} samples/s ({DENOISE} DDIM steps, {RES} px); evaluate {result.duration_s:.2f} s"
        if device == "cpu":
            ctx.cpu["samples"], ctx.cpu["rates"] = arrays, rates
            return Row(f"sampling {device} {dtype}", "ran", measured, "the reference for the GPU rows")
        ref = ctx.cpu.get("samples")
        diff = np.abs(arrays - ref) if ref is not None else None
        note = (f"vs CPU: max |d| {diff.max()}/255, mean {diff.mean():.2f}; rates "
                f"{'same' if rates == ctx.cpu['rates'] else 'differ'}") if diff is not None else "no CPU reference"
        return Row(f"sampling {device} {dtype}", "ran", measured, note)
    return check


def clip(device: str, precision: str):
    def check(ctx) -> Row:
        if device != "cpu":
            need_gpus()
        need("open_clip")
        from PIL import Image
        from tiny_models import write_tiny_clip

        from memtrack.embedders.registry import get_embedder

        tiny = ctx.cpu.get("clip_model") or write_tiny_clip(ctx.work / "clip", name="tiny-clip-gpu", image_size=64)
        ctx.cpu["clip_model"] = tiny
        rng = np.random.default_rng(0)
        ims = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(64)]
        emb = get_embedder({"name": "clip", "model": tiny.name, "model_config": str(tiny.config),
                            "pretrained": str(tiny.weights), "device": device, "precision": precision,
                            "batch_size": 32})
        vectors, dt = _timed(emb.embed, ims)
        measured = f"{len(ims) / dt:.0f} images/s (64 px tiny ViT)"
        if device == "cpu":
            ctx.cpu["clip"] = vectors
            return Row(f"clip {device} {precision}", "ran", measured, "the reference for the GPU rows")
        cos = float(np.min(np.sum(vectors * ctx.cpu["clip"], axis=1))) if "clip" in ctx.cpu else float("nan")
        return Row(f"clip {device} {precision}", "ran", measured, f"lowest cosine to the CPU embedding: {cos:.4f}")
    return check


def check_t2i(ctx) -> Row:
    need_gpus()
    need("transformers")
    from tiny_models import write_tiny_sd

    from memtrack.sampling.checkpoints import discover
    from memtrack.scan.tracker import Tracker

    base = write_tiny_sd(ctx.work / "tiny-sd")
    cfg = _cfg(**{"sampling.device": "cuda:0", "sampling.pretrained_model": str(base), "sampling.prompts": "instance",
                  "sampling.instance_prompt": "a photo of sks dog", "sampling.resolution": 16,
                  "sampling.num_samples": 4, "sampling.batch_size": 4})
    (ck,) = discover(base)  # the base saved as a pipeline: evaluated as a run's final pipeline
    tracker = Tracker.from_config(cfg, index=ctx.index, run_dir=base, store=False)
    result = tracker.evaluate(ck)
    if result.skipped:
        raise RuntimeError(f"skipped: {result.reason}")
    return Row("text-to-image cuda:0", "ran", f"{result.n_samples} samples, evaluate {result.duration_s:.2f} s",
               "tiny Stable Diffusion base, 16 px")


def check_faiss_gpu(ctx) -> Row:
    import faiss

    from memtrack.index.files import to_gpu

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() <= 0:
        raise Skip("faiss has no GPU support here (faiss-cpu, or no GPU)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 512), dtype=np.float32)
    q = rng.standard_normal((2_000, 512), dtype=np.float32)
    cpu = faiss.IndexFlatL2(512)
    cpu.add(x)
    (_, want), t_cpu = _timed(cpu.search, q, 10)
    gpu = to_gpu(cpu)
    if gpu is cpu:
        raise RuntimeError("to_gpu left the index on the CPU")
    (_, got), t_gpu = _timed(gpu.search, q, 10)
    same = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)]))
    return Row("faiss-gpu", "ran", f"{1000 * t_gpu / len(q):.3f} ms/query vs CPU {1000 * t_cpu / len(q):.3f} "
               "(200k x 512 Flat)", f"top-10 agreement with the CPU: {same:.4f}")


def check_arcface(ctx) -> Row:
    need_gpus()
    need("onnx")
    need("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip("onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    from memtrack.embedders.face import FaceEmbedder, FaceOptions

    path = _tiny_arcface(ctx.work / "arcface.onnx")
    chips = np.random.default_rng(0).integers(0, 256, (64, 112, 112, 3), dtype=np.uint8)
    out = {}
    for device in ("cpu", "cuda:0"):
        emb = FaceEmbedder(FaceOptions(backend="arcface", model_path=str(path), align="assume_aligned",
                                       device=device))
        out[device] = _timed(emb.embed_chips, chips)
    cos = float(np.min(np.sum(out["cpu"][0] * out["cuda:0"][0], axis=1)))
    return Row("arcface cuda:0", "ran", f"{len(chips) / out['cuda:0'][1]:.0f} chips/s vs CPU "
               f"{len(chips) / out['cpu'][1]:.0f}", f"lowest cosine to the CPU embedding: {cos:.4f}")


def _tiny_arcface(path: Path) -> Path:
    """A random ONNX model with ArcFace's interface: [N, 3, 112, 112] -> [N, 32]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 16, 16)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.1, (4 * 7 * 7, 32)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w"], ["c"], strides=[16, 16]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["683"])],
        "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 32])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def check_sidecar(ctx) -> Row:
    need_gpus(2)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-sidecar", str(ctx.run), str(ctx.index)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["memory"][0] != 0 or got["memory"][1] <= 0:
        raise RuntimeError(f"memory by device {got['memory']}: expected only cuda:1 in use")
    return Row("sidecar cuda:1", "ran", f"{got['evaluated']} checkpoint(s) in {time.perf_counter() - t:.1f} s "
               "(child process, with start-up)", f"peak bytes by device: {got['memory']}")


def child_sidecar(run: str, index: str) -> None:
    """The watcher on cuda:1, as ``memtrack watch --device cuda:1 --once`` runs it; prints memory by device."""
    import torch

    from memtrack.integrations.watch import Watcher
    from memtrack.scan.tracker import Tracker

    tracker = Tracker.from_config(_cfg(**{"sampling.device": "cuda:1"}), index=index, run_dir=run,
                                  store_dir=Path(tempfile.mkdtemp()) / "store")
    results = Watcher(tracker, run, sink=None).finish()
    tracker.close()
    print(json.dumps({"evaluated": sum(not r.skipped for r in results),
                      "memory": [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]}))


CHECKS = [("environment", check_environment), ("sampling cpu float32", sampling("cpu", "float32")),
          ("sampling cuda:0 float32", sampling("cuda:0", "float32")),
          ("sampling cuda:0 float16", sampling("cuda:0", "float16")),
          ("sampling cuda:0 bfloat16", sampling("cuda:0", "bfloat16")),
          ("clip cpu fp32", clip("cpu", "fp32")), ("clip cuda fp32", clip("cuda", "fp32")),
          ("clip cuda fp16", clip("cuda", "fp16")), ("text-to-image cuda:0", check_t2i),
          ("faiss-gpu", check_faiss_gpu), ("arcface cuda:0", check_arcface), ("sidecar cuda:1", check_sidecar)]


# ----------------------------------------------------------------------------------------------- main


def run_checks(ctx) -> list[Row]:
    rows = []
    for name, fn in CHECKS:
        t = time.perf_counter()
        try:
            row = fn(ctx)
        except Skip as why:
            row = Row(name, "skipped", "", str(why))
        except Exception as exc:  # a failed check is a row of the table, never the end of the run
            if os.environ.get("MEMTRACK_DEBUG"):
                traceback.print_exc()
            row = Row(name, "failed", "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        row.note = f"{row.note} [{time.perf_counter() - t:.1f} s]".strip()
        rows.append(row)
        print(f"  {row.check:<26} {row.status}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in rows + [Row("check", "status", "measurement", "note")])
              for f in ("check", "status", "measurement")]
    lines = [f"{'check':<{widths[0]}} | {'status':<{widths[1]}} | {'measurement':<{widths[2]}} | note"]
    lines.append("-" * len(lines[0]))
    lines += [f"{r.check:<{widths[0]}} | {r.status:<{widths[1]}} | {r.measurement:<{widths[2]}} | {r.note}"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--quick", action="store_true", help="4 samples x 2 denoising steps (a smoke run)")
    p.add_argument("--child-sidecar", nargs=2, metavar=("RUN", "INDEX"), help=argparse.SUPPRESS)
    args = p.parse_args()
    global N_SAMPLES, DENOISE
    if args.quick:
        N_SAMPLES, DENOISE = 4, 2
    if args.child_sidecar:
        child_sidecar(*args.child_sidecar)
        return 0
    t0 = time.perf_counter()
    print("no GPU: torch sees no CUDA device; running the CPU references, skipping the GPU checks"
          if cuda_count() == 0 else f"{cuda_count()} GPU(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="memtrack-gpu-check-") as tmp:
        rows = run_checks(Context(Path(tmp)))
    print(table(rows))
    failed = [r.check for r in rows if r.status == "failed"]
    print(f"{sum(r.status == 'ran' for r in rows)} ran, {sum(r.status == 'skipped' for r in rows)} skipped, "
          f"{len(failed)} failed in {time.perf_counter() - t0:.0f} s" + (f": {', '.join(failed)}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
