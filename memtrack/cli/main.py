"""``memtrack`` command line: a thin layer that parses, calls the library, and prints.

Exit codes: 0 success, 1 a ``--fail-on`` gate tripped, 2 an error (bad input, a missing file, or anything
unforeseen -- never 1), 130 interrupted. Errors print one sentence and a hint; ``MEMTRACK_DEBUG=1`` also
prints the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from pathlib import Path

from memtrack.errors import ConfigError, MemtrackError
from memtrack.utils import atomic_write_json, to_json

EPILOG = """\
examples:
  memtrack index build data/train --out ref/ --embedders pixel,clip
  memtrack scan runs/ddpm --index ref/
  memtrack report runs/ddpm --out report.html --fail-on "nn_ratio.rate > 0.01"
  memtrack check samples/ --index ref/ --json
  memtrack demo --out demo/
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memtrack", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Track when a diffusion model starts to memorize its training set.",
                                epilog=EPILOG)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # index build
    idx = sub.add_parser("index", help="build or inspect a reference index of a training set")
    isub = idx.add_subparsers(dest="index_command", metavar="VERB")
    b = isub.add_parser("build", help="embed a training set and build its reference index",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  memtrack index build data/train --out ref/ --embedders pixel,clip\n"
                               "  memtrack index build data/train --out ref/ --resolution 64 --center-crop "
                               "--random-flip\n"
                               "  memtrack index build shards/ --out ref/ --index-type auto --memory-budget 16GB\n"
                               "  memtrack index build data/new --out ref/ --add\n"
                               "  accelerate launch --num_processes 4 -m memtrack index build data/ --out ref/")
    b.add_argument("data", help="training set: a folder (plain, or HF imagefolder with metadata.jsonl/.csv), "
                                "webdataset .tar shards, or a .parquet list of paths")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--embedders", help="comma-separated spaces, e.g. pixel,clip,face (default: config or pixel)")
    b.add_argument("--resolution", type=int, help="pixel space resolution (default 32, or --train-resolution "
                                                  "when that is smaller)")
    b.add_argument("--config", help="YAML config file")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    b.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    b.add_argument("--index-type", choices=["auto", "flat", "hnsw", "ivf_flat", "ivf_pq"],
                   help="faiss index (index.index_type; default auto: exact Flat for small sets)")
    b.add_argument("--memory-budget", help="memory the faiss index may take, e.g. 16GB (index.memory_budget)")
    b.add_argument("--recall-target", type=float, help="recall@k to tune approximate indexes to (default 0.95)")
    t = b.add_argument_group("training transform", "what the training script did to each image (docs/transform.md); "
                                                   "the pixel space indexes exactly the views it can show the model")
    t.add_argument("--train-resolution", type=int, metavar="N",
                   help="the script's --resolution (data.transform.resolution; default: --resolution)")
    crop = t.add_mutually_exclusive_group()
    crop.add_argument("--center-crop", dest="crop", action="store_const", const="center",
                      help="the run passes --center_crop (the default here)")
    crop.add_argument("--random-crop", dest="crop", action="store_const", const="random",
                      help="the run crops at random (the scripts' default without --center_crop): crops along the "
                           "long side are indexed")
    t.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="the run passes --random_flip: mirrored views are indexed too")
    t.add_argument("--interpolation", choices=["bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box",
                                               "hamming"],
                   help="the script's --image_interpolation_mode (default bilinear)")
    b.add_argument("--add", action="store_true", help="add DATA to the existing index at --out (no rebuild)")
    b.add_argument("--shard-dir", help="embed shard by shard into this folder; rerun the same command to resume")
    b.add_argument("--card", action="store_true",
                   help="also measure the detector card on 16 of these training images (copies, flips, crops, "
                        "blends, morphs; at most ~160 images through the detectors) and store it in the index; "
                        "reports show it")
    info = isub.add_parser("info", help="describe an index")
    info.add_argument("index")
    info.add_argument("--json", action="store_true")

    # scan
    s = sub.add_parser("scan", help="sample and evaluate every checkpoint of a training run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  memtrack scan runs/ddpm --index ref/ --num-samples 64")
    s.add_argument("run", help="the training run's --output_dir (holds checkpoint-N folders)")
    s.add_argument("--index", required=True, help="reference index folder")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--num-samples", type=int, help="samples per checkpoint (sampling.num_samples)")
    s.add_argument("--steps", type=int, help="denoising steps (sampling.num_inference_steps)")
    s.add_argument("--device", help="torch device for sampling, e.g. cuda:1 (sampling.device)")
    s.add_argument("--no-ema", action="store_true", help="evaluate unet/ even when unet_ema/ exists")
    s.add_argument("--store", help="store folder (default RUN/memtrack)")
    s.add_argument("--force", action="store_true", help="re-evaluate checkpoints already stored")
    s.add_argument("--json", action="store_true", help="print per-checkpoint results as JSON lines")
    s.add_argument("--threads", type=int, help="CPU threads (tracking.threads; default: all usable cores)")

    # report
    r = sub.add_parser("report", help="write report.html + summary.json for one or more runs",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  memtrack report runs/ddpm --out report.html\n"
                              "  memtrack report runs/a runs/b --out compare.html\n"
                              "  memtrack report runs/ddpm --fail-on 'nn_ratio.rate > 0.01' "
                              "--fail-on 'identity_leak.onset != null'\n"
                              "  memtrack report runs/ddpm --key 3f2a9c   # another evaluation series of the run")
    r.add_argument("runs", nargs="+", help="run folder(s); several are overlaid on the same axes")
    r.add_argument("--out", help="output file (default RUN/memtrack/report.html); summary.json goes beside it")
    r.add_argument("--format", choices=["html", "md", "json"], default="html")
    r.add_argument("--index", help="index folder (default: the one the run was scanned with)")
    r.add_argument("--store", help="store folder (default RUN/memtrack)")
    r.add_argument("--fail-on", action="append", default=[], metavar="EXPR",
                   help="gate, e.g. 'nn_ratio.rate > 0.01'; exit 1 when it holds")
    r.add_argument("--quiet", action="store_true", help="do not print the terminal table")
    _series_args(r)

    st = sub.add_parser("status", help="print the latest checkpoint's rates and onsets",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  memtrack status runs/ddpm\n  memtrack status runs/ddpm --key 3f2a9c\n"
                               "  memtrack status runs/ddpm --config configs/unconditional.yaml --json")
    st.add_argument("run")
    st.add_argument("--store", help="store folder (default RUN/memtrack)")
    st.add_argument("--index", help="index folder, for --config (default: the one the run was scanned with)")
    st.add_argument("--json", action="store_true")
    _series_args(st)

    # check
    c = sub.add_parser("check", help="run the detectors on any folder of generated images",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  memtrack check samples/ --index ref/ --json")
    c.add_argument("images", help="folder of generated images (any model or service)")
    c.add_argument("--index", required=True)
    c.add_argument("--config", help="YAML config file")
    c.add_argument("--json", action="store_true", help="print one JSON object")

    # demo
    d = sub.add_parser("demo", help="train a tiny DDPM on CPU and show memorization emerging",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  memtrack demo --out demo/")
    d.add_argument("--out", required=True, help="folder for the demo's data, run, index and report")
    d.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests; no onset expected)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")

    sub.add_parser("env", help="print versions and registries, for bug reports")

    for name, mod in _plugins():
        mod.add_parser(sub)
    return p


def _series_args(p: argparse.ArgumentParser) -> None:
    """``--key`` / ``--config``: which evaluation series of the run to show (default: the latest)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key", metavar="KEY", help="show the evaluation series KEY of the (first) run instead of the "
                                                "latest; a prefix is enough (the report lists the run's series)")
    g.add_argument("--config", metavar="FILE", help="show the series that this config file and the run's index "
                                                    "give the run's checkpoints")


def _plugins():
    """Sub-commands contributed by other modules (watch, launch): (name, module with add_parser/run)."""
    from memtrack.cli import integrations as integ

    return [("integrations", integ)]


# --------------------------------------------------------------------------------------------- commands


def _overrides(args) -> dict:
    return {"sampling.num_samples": getattr(args, "num_samples", None),
            "sampling.num_inference_steps": getattr(args, "steps", None),
            "sampling.device": getattr(args, "device", None),
            "sampling.prefer_ema": False if getattr(args, "no_ema", False) else None,
            "tracking.threads": getattr(args, "threads", None)}


def cmd_index_build(args) -> int:
    from memtrack.config import EmbedderSpec, load_config
    from memtrack.data.dataset import read_dataset
    from memtrack.embedders.registry import embedder_class, get_embedder
    from memtrack.index.reference import ReferenceIndex
    from memtrack.index.shards import distributed_state

    transform = {"data.transform.resolution": args.train_resolution, "data.transform.crop": args.crop,
                 "data.transform.flip": args.random_flip, "data.transform.interpolation": args.interpolation}
    transform_flags = any(v is not None for v in transform.values())
    if args.add and (args.overwrite or args.shard_dir or args.index_type or transform_flags):
        raise ConfigError("--add cannot be combined with --overwrite, --shard-dir, --index-type or the transform flags",
                          hint="--add extends the index at --out as it was built")
    cfg = load_config(args.config, {"index.index_type": args.index_type, "index.memory_budget": args.memory_budget,
                                    "index.recall_target": args.recall_target, **transform})
    if args.embedders:
        cfg.index.embedders = [EmbedderSpec(n.strip(), {}) for n in args.embedders.split(",") if n.strip()]
    if args.resolution:
        for spec in cfg.index.embedders:
            if spec.name == "pixel":
                spec.options["resolution"] = args.resolution
    for spec in cfg.index.embedders:  # the spaces that follow the training transform take data.transform
        spec.options = embedder_class(spec.name).options_for_transform(spec.options, cfg.data.transform.set_fields())
    state = distributed_state()
    if args.add:
        if state is not None:
            raise ConfigError("--add runs in one process", hint="run it without accelerate launch")
        ref = ReferenceIndex.open(args.out)
        embedders = [get_embedder(spec) for spec in cfg.index.embedders] if args.embedders else \
            [get_embedder({"name": n, **s.info.get("options", {})}) for n, s in ref.spaces.items()]
        before = ref.n_train
        ref = ref.add(read_dataset(args.data, cfg.data), embedders, _add_config(ref, args))
        print(f"added {ref.n_train - before} training images from {args.data} to {args.out}")
        if args.json:
            print(to_json(_index_info(ref), indent=2))
        else:
            _print_index(_index_info(ref))
        if args.card:
            _write_index_card(ref, cfg, quiet=args.json)
        return 0
    embedders = [get_embedder(spec) for spec in cfg.index.embedders]
    ds = read_dataset(args.data, cfg.data, show_progress=state is None or state.is_main_process)
    ref = ReferenceIndex.build(ds, embedders, args.out, cfg, overwrite=args.overwrite, shard_dir=args.shard_dir,
                               state=state)
    if ref is None:  # another process of a sharded build: the main process writes the index
        return 0
    info = _index_info(ref)
    if args.json:
        print(to_json(info, indent=2))
    else:
        print(f"indexed {ref.n_train} training images from {args.data} into {args.out}")
        _print_index(info)
    if args.card:
        _write_index_card(ref, cfg, quiet=args.json)
    return 0


def _write_index_card(ref, cfg, quiet: bool = False) -> None:
    from memtrack.card.measure import INDEX_CARD, index_card

    atomic_write_json(Path(ref.path) / INDEX_CARD, index_card(ref, cfg))
    if not quiet:
        print(f"wrote the detector card of {ref.path} ({INDEX_CARD}); reports of runs scanned against it show it")


def _add_config(ref, args):
    """The index's own config, with --recall-target applied."""
    from memtrack.index.update import index_config

    cfg = index_config(ref)
    if args.recall_target is not None:
        cfg.index.recall_target = args.recall_target
    return cfg


def _index_info(ref) -> dict:
    return {"path": str(ref.path), "n_train": ref.n_train, "content_hash": ref.content_hash,
            "skipped": ref.manifest.get("skipped", []),
            "spaces": {n: {"dim": s.dim, "metric": s.metric, "vectors": int(len(s.vectors)),
                           "views": int(s.info.get("views", 1)),
                           "fingerprint": s.fingerprint, "index": s.info.get("factory", s.info.get("index_type")),
                           "on_disk": bool(s.info.get("on_disk")), "recall_at_k": s.info.get("recall_at_k"),
                           "recall_2nd": s.info.get("recall_2nd"), "choice_reason": s.info.get("choice_reason"),
                           "search_params": s.info.get("search_params", {})} for n, s in ref.spaces.items()},
            "baseline": {n: {k: v for k, v in b.items() if k != "values"}
                         for n, b in ref.manifest.get("baseline", {}).items()}}


def _print_index(info: dict) -> None:
    from memtrack.embedders.pixel import describe_transform

    for name, sp in info["spaces"].items():
        base = info["baseline"].get(name, {})
        print(f"  {name:<8} {sp['vectors']:>7} vectors  dim {sp['dim']:<5} metric {sp['metric']:<6}  "
              f"train->train {base.get('statistic', '')}: mean {base.get('mean', float('nan')):.3f} "
              f"p95 {base.get('p95', float('nan')):.3f}")
        if isinstance(sp["fingerprint"].get("transform"), dict):
            print(f"           training transform {describe_transform(sp['fingerprint']['transform'])}, alpha "
                  f"{sp['fingerprint'].get('alpha')}; up to {sp.get('views', 1)} vector(s) per image")
        if sp.get("index") and sp["index"] not in ("Flat", "IndexFlatL2", "IndexFlatIP"):
            print(f"           index {sp['index']}{' (lists on disk)' if sp['on_disk'] else ''}  "
                  f"recall@k {sp['recall_at_k']}  {sp['search_params']}")
        if sp.get("recall_2nd") is not None:
            print(f"           2nd-nearest training image of generated-like queries found: {sp['recall_2nd']:.1%}"
                  + (" (exact search)" if sp.get("index") in ("Flat", "IndexFlatL2") else ""))
    if info["skipped"]:
        print(f"  skipped {len(info['skipped'])} unreadable file(s):")
        for s in info["skipped"][:10]:
            print(f"    {s['path']}: {s['reason']}")


def cmd_index_info(args) -> int:
    from memtrack.index.reference import ReferenceIndex

    info = _index_info(ReferenceIndex.open(args.index))
    if args.json:
        print(to_json(info, indent=2))
    else:
        print(f"{info['path']}: {info['n_train']} training images, content {info['content_hash']}")
        _print_index(info)
    return 0


def cmd_scan(args) -> int:
    from memtrack.budget import for_command
    from memtrack.sampling.checkpoints import discover
    from memtrack.config import load_config
    from memtrack.index.reference import ReferenceIndex
    from memtrack.integrations.transform import verify_run_transform
    from memtrack.scan.tracker import Tracker

    cfg = load_config(args.config, _overrides(args))
    for_command(cfg, beside_training=False)  # before any torch work (memtrack/budget.py)
    cks = discover(args.run, prefer_ema=cfg.sampling.prefer_ema)
    ref = ReferenceIndex.open(args.index)
    transform = verify_run_transform(ref, cfg, args.run)  # the run's hparams.yml, when it wrote one
    tracker = Tracker.from_config(cfg, index=ref, run_dir=args.run, store_dir=args.store)
    if tracker.store is not None:
        tracker.store.set_meta("training_transform", transform)
    series = set()
    try:
        for ck in cks:
            res = tracker.evaluate(ck, force=args.force)
            series.add(res.series)
            if args.json:
                print(to_json({"step": res.step, "checkpoint": res.checkpoint, "cached": res.cached,
                                  "skipped": res.skipped, "reason": res.reason, "metrics": res.metrics,
                                  "series": res.series}), flush=True)
            else:
                print(_scan_line(res), flush=True)
    finally:
        tracker.close()
    if not args.json:
        named = ", ".join(sorted(k for k in series if k))
        print(f"results stored in {tracker.store.folder if tracker.store else args.run}"
              + (f" (evaluation series {named})" if named else "") + f"; next: memtrack report {args.run}")
    return 0


def _scan_line(res) -> str:
    if res.skipped:
        return f"{res.checkpoint:>18}  skipped: {res.reason}"
    parts = [f"{n} {m['rate']:.2f} [{m['ci_low']:.2f},{m['ci_high']:.2f}]"
             for n, m in res.metrics.items() if "rate" in m]
    tag = " (stored earlier)" if res.cached else f" ({res.duration_s:.1f}s)"
    return f"{res.checkpoint:>18}  step {res.step:>6}  " + "  ".join(parts) + tag


def cmd_report(args) -> int:
    from memtrack.report.write import write_report

    code = write_report(args.runs, out=args.out, fmt=args.format, index=args.index, store_dir=args.store,
                        gates=args.fail_on, quiet=args.quiet, key=args.key, config=args.config)
    return code


def cmd_status(args) -> int:
    from memtrack.report.write import run_summary
    from memtrack.report.terminal import render_table

    summary = run_summary(args.run, store_dir=args.store, index=args.index, with_index=False, key=args.key,
                          config=args.config)
    if args.json:
        print(to_json(summary, indent=2, default=str))
    else:
        print(render_table(summary))
    return 0


def cmd_check(args) -> int:
    from memtrack.scan.check import check_folder

    result = check_folder(args.images, args.index, args.config)
    if args.json:
        print(to_json(result, indent=2))
        return 0
    images = result["images"]
    wide = max([len("image")] + [len(im["file"]) for im in images])
    near = max([len("nearest training image")] + [len(im["matches"][0]["train_id"]) for im in images if im["matches"]])
    print(f"{'image':<{wide}}  {'nearest training image':<{near}}  flagged by")
    for im in images:
        flags = [n for n, f in im["flags"].items() if f]
        best = im["matches"][0]["train_id"] if im["matches"] else "-"
        print(f"{im['file']:<{wide}}  {best:<{near}}  {', '.join(flags) if flags else '-'}")
    print()
    name_w = max([len(n) for n in result["rates"]] + [8])
    for name, r in result["rates"].items():
        print(f"{name:<{name_w}}  {r['count']}/{r['n']} = {r['rate']:.3f}  95% CI [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    for s in result.get("skipped", []):
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from memtrack.demo.run import run_demo

    paths = run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite)
    print(f"report:  {paths['report']}\nsummary: {paths['summary']}")
    return 0


def cmd_env(args) -> int:
    import platform

    from memtrack import __version__
    from memtrack.detectors.registry import list_detectors
    from memtrack.embedders.registry import list_embedders

    lines = [f"memtrack {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    for mod in ("torch", "torchvision", "diffusers", "accelerate", "open_clip", "faiss", "numpy", "PIL",
                "transformers", "dlib", "onnxruntime"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # report, don't fail: env is for bug reports
            lines.append(f"{mod} not installed")
    try:
        import torch

        lines.append(f"cuda available: {torch.cuda.is_available()}; threads: {torch.get_num_threads()}")
    except Exception:
        pass
    lines.append(f"embedders: {', '.join(list_embedders())}")
    lines.append(f"detectors: {', '.join(list_detectors())}")
    print("\n".join(lines))
    return 0


COMMANDS = {("index", "build"): cmd_index_build, ("index", "info"): cmd_index_info, ("scan", None): cmd_scan,
            ("report", None): cmd_report, ("status", None): cmd_status, ("check", None): cmd_check,
            ("demo", None): cmd_demo, ("env", None): cmd_env}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from memtrack import __version__

        print(f"memtrack {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    key = (args.command, getattr(args, "index_command", None))
    fn = COMMANDS.get(key) or COMMANDS.get((args.command, None))
    for _, mod in _plugins():
        fn = fn or mod.commands().get(args.command)
    if fn is None:
        parser.parse_args([args.command, "--help"])
        return 2
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("memtrack: interrupted; results stored so far are intact", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the one error printer: every error is exit 2, never the gate's 1
        return _print_error(exc, args.command)


def _print_error(exc: Exception, command: str) -> int:
    """Print ``exc`` as one sentence and a hint (and its traceback with ``MEMTRACK_DEBUG=1``); return 2.

    Anything that is not a :class:`MemtrackError` is a failure memtrack did not foresee (a bug, or a
    library's own error): it still exits 2, so scripts never read it as a tripped gate (exit 1).
    """
    if os.environ.get("MEMTRACK_DEBUG"):
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, MemtrackError):
        message, hint = exc.message, exc.hint
    elif isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        message = f"{exc.strerror or exc}{where}"
        hint = "check the path, permissions and free disk space; MEMTRACK_DEBUG=1 shows the traceback"
    else:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        message = f"unexpected {type(exc).__name__} in `memtrack {command}`" + (f": {first}" if first else "")
        hint = ("this is a bug in memtrack or in a library it calls; MEMTRACK_DEBUG=1 shows the traceback "
                "(please report it with the output of `memtrack env`)")
    print(f"memtrack: error: {message}", file=sys.stderr)
    if hint:
        print(textwrap.indent(f"hint: {hint}", "  "), file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
