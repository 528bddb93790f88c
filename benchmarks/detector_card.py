"""The detector card: what each memtrack detector can and cannot see, measured on labelled real images.

Ground truth from photographs that installed packages ship (nothing is downloaded):

* training images: scikit-image's photographs (coffee, chelsea, rocket, camera, coins,
  immunohistochemistry, retina, clock, cell, stereo_motorcycle), each whole and as its four quarters,
  plus two face chips each of Eileen Collins (skimage ``astronaut``) and Grace Hopper (matplotlib's
  ``grace_hopper.jpg``) with identity labels -- the demo's chips (``memtrack.demo.train.build_demo_dataset``);
  ``--duplicates`` of the scenes are present twice (the second copy with noise sigma 0.01);
* novel (held-out) images: other photographs (page, text, hubble_deep_field, whole and quartered; the
  moon, brick, grass and gravel textures), never trained on;
* other people: faces of scikit-image's ``lfw_subset`` (25-px grayscale Labeled Faces in the Wild crops,
  upscaled; their identities are not labelled and are assumed to be neither training person).

The photographs of the two training people are used only as their face chips, so no scene shows a
training face. Cases and labels: :mod:`memtrack.card.cases`. Measurement: :func:`memtrack.card.measure.measure_card`
builds a real reference index (pixel space at ``--resolution``, default 32 px -- the demo's, and what
users of small DDPMs have; the face space with dlib, ``align: assume_aligned`` as the demo) and judges every
case through ``Tracker.assess``, the path of ``memtrack check``. CLIP is left out: with random weights its
numbers would mean nothing (``--embedders ... --option clip.pretrained=FILE`` measures a real one).

Prints one row per detector x case type -- n, TP/FP/FN/TN, recall, false-positive rate and precision with
95% Wilson intervals, matches to the wrong image -- then the card as one JSON object on the last line.

    python benchmarks/detector_card.py --out card.json
    python benchmarks/detector_card.py --option pixel.flip=true --write-package-card   # the shipped card
                                                                    # (mirrored views indexed, as --random_flip runs)
    python benchmarks/detector_card.py --resolution 16 --embedders pixel --n-train 6 --cases exact,novel
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from memtrack.card.measure import measure_card  # noqa: E402
from memtrack.card.cases import CASE_TYPES, Source, ground_truth  # noqa: E402
from memtrack.config import EmbedderSpec  # noqa: E402
from memtrack.report.card import PACKAGE_CARD, card_rows  # noqa: E402
from memtrack.utils import atomic_write_text, to_json  # noqa: E402

TRAIN_PHOTOS = ["coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "retina", "clock", "cell",
                "stereo_motorcycle"]
NOVEL_PHOTOS = ["page", "text", "hubble_deep_field"]
NOVEL_TEXTURES = ["moon", "brick", "grass", "gravel"]
FACE_MIN_RESOLUTION = 20   # the face embedder's min_face: below it no image is a face


def photo(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    a = a[0] if isinstance(a, tuple) else a          # stereo_motorcycle: (left, right, disparity)
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def with_quarters(name: str) -> list[Source]:
    """The photograph and its four quarters (each half its width and height): distinct training images."""
    im = photo(name)
    w, h = im.size
    out = [Source(name, im)]
    for q, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
        out.append(Source(f"{name}_q{q}", im.crop((x, y, x + w // 2, y + h // 2))))
    return out


def face_sources(resolution: int) -> list[Source]:
    """The demo's two face chips of each training person, at 4x the working resolution (the sources)."""
    from memtrack.demo.train import build_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_demo_dataset(Path(tmp), 4 * resolution)
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        return [Source(Path(r["file_name"]).stem, Image.open(folder / r["file_name"]).convert("RGB"), r["identity"])
                for r in rows if r.get("identity")]


def other_people(n: int) -> list[Source]:
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the next 100 are not
    return [Source(f"lfw_{i:03d}", Image.fromarray((np.clip(f, 0, 1) * 255).astype(np.uint8)).convert("RGB"))
            for i, f in enumerate(faces[:n])]


def sources(args) -> tuple[list, list, list]:
    train = [s for name in TRAIN_PHOTOS for s in with_quarters(name)][:args.n_train]
    novel = [s for name in NOVEL_PHOTOS for s in with_quarters(name)] + [Source(n, photo(n)) for n in NOVEL_TEXTURES]
    novel = novel[:args.n_novel]
    face = "face" in args.embedders
    if face:
        train += face_sources(args.resolution)
    return train, novel, other_people(args.n_others) if face else []


def embedder_specs(args) -> list[EmbedderSpec]:
    opts: dict[str, dict] = {"pixel": {"resolution": args.resolution}, "face": {"align": "assume_aligned"}}
    for item in args.option:
        key, _, value = item.partition("=")
        space, _, field = key.partition(".")
        if not field or not _:
            raise SystemExit(f"--option {item!r}: expected SPACE.KEY=VALUE")
        opts.setdefault(space, {})[field] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value
    return [EmbedderSpec(name, dict(opts.get(name, {}))) for name in args.embedders]


def fmt_rate(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{100 * r['value']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"


def print_table(card: dict) -> None:
    head = ["detector", "case", "n", "TP", "FP", "FN", "TN", "recall [95% CI]", "FPR [95% CI]",
            "precision [95% CI]", "wrong match"]
    rows = [head]
    for det, kind, c in card_rows(card):
        if c.get("applicable") is False:
            rows.append([det, kind, "n/a", "", "", "", "", f"not applicable: {c.get('reason')}", "", "", ""])
            continue
        rows.append([det, kind, c["n"], c["tp"], c["fp"], c["fn"], c["tn"], fmt_rate(c["recall"]),
                     fmt_rate(c["fpr"]), fmt_rate(c["precision"]), c["wrong_match"]])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=32, help="working resolution in pixels (default 32)")
    p.add_argument("--embedders", type=lambda s: [x for x in s.split(",") if x], default=["pixel", "face"],
                   help="index spaces (default pixel,face; face is dropped below 20 px or without dlib)")
    p.add_argument("--option", action="append", default=[], metavar="SPACE.KEY=VALUE",
                   help="an embedder option, e.g. clip.pretrained=/path/model.bin (repeatable)")
    p.add_argument("--cases", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help=f"case types (default all: {', '.join(CASE_TYPES)})")
    p.add_argument("--n-train", type=int, default=50, help="training scenes (default 50: 10 photos + quarters)")
    p.add_argument("--n-novel", type=int, default=19, help="held-out images (default 19)")
    p.add_argument("--n-others", type=int, default=100, help="faces of other people (default 100)")
    p.add_argument("--duplicates", type=int, default=4, help="training scenes present twice (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch/faiss (0: library default)")
    p.add_argument("--out", type=Path, help="also write the card JSON here")
    p.add_argument("--write-package-card", action="store_true",
                   help=f"write the card into the package ({PACKAGE_CARD.relative_to(ROOT)}) for the reports")
    args = p.parse_args(argv)
    _threads(args.threads)
    args.embedders = _usable(args.embedders, args.resolution)
    train, novel, others = sources(args)
    gt = ground_truth(train, novel, others, resolution=args.resolution, duplicates=args.duplicates,
                      case_types=args.cases, seed=args.seed)
    command = "python benchmarks/detector_card.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                      if (argv if argv is not None else sys.argv[1:]) else "")
    card = measure_card(gt, embedder_specs(args), images=_images_sentence(args, train, novel, others),
                        command=command)
    print_table(card)
    text = to_json(card)
    for path in ([args.out] if args.out else []) + ([PACKAGE_CARD] if args.write_package_card else []):
        atomic_write_text(path, to_json(card, indent=1) + "\n")
    print(text)
    return card


def _usable(embedders: list[str], resolution: int) -> list[str]:
    if "face" not in embedders:
        return embedders
    from memtrack.embedders.face import is_dlib_available

    if resolution < FACE_MIN_RESOLUTION or not is_dlib_available():
        why = f"{resolution} px is below the face embedder's min_face" if is_dlib_available() else "dlib is missing"
        print(f"note: face space left out ({why})", file=sys.stderr)
        return [e for e in embedders if e != "face"]
    return embedders


def _images_sentence(args, train, novel, others) -> str:
    faces = [s.name for s in train if s.identity]
    people = f", {len(faces)} face chips of 2 people (the demo: astronaut, grace_hopper)" if faces else ""
    return (f"{len(train) - len(faces)} training scenes from scikit-image photographs ({', '.join(TRAIN_PHOTOS)}: "
            f"whole and quartered){people}; {len(novel)} held-out images ({', '.join(NOVEL_PHOTOS + NOVEL_TEXTURES)})"
            + (f"; {len(others)} other people from skimage.data.lfw_subset (25-px grayscale)" if others else ""))


def _threads(n: int) -> None:
    if n <= 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


if __name__ == "__main__":
    main()
