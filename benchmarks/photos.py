"""Real photographs that installed packages ship, as many distinct square images as the benchmarks need.

scikit-image's ``skimage.data`` (11 photographs that load offline) and matplotlib's ``grace_hopper.jpg``,
then the four corner quarters of eight of them -- crops far apart in pixels, so each is a distinct
training image. (The texture images -- moon, brick, grass, gravel -- and the quarters of the Hubble deep
field are left out: at 16-32 px they are near-uniform and lie within 0.05 RMS of each other.) Every 6th
image of the pool is held out (never trained on), so the held-out set mixes whole photographs and crops
like the training sets do.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

WHOLE = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "grace_hopper", "immunohistochemistry",
         "hubble_deep_field", "retina", "clock", "cell"]
QUARTERED = ["astronaut", "coffee", "chelsea", "grace_hopper", "immunohistochemistry", "camera", "coins", "retina"]
HOLDOUT_EVERY = 6


def _photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    import skimage.data

    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")


def _square(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return im.crop(box).resize((size, size), Image.Resampling.LANCZOS)


def pool(size: int) -> list[tuple[str, Image.Image]]:
    """``(name, image)`` for the 12 whole photographs, then 32 quarters: 44 distinct images."""
    out = [(n, _square(_photo(n), size)) for n in WHOLE]
    for n in QUARTERED:
        im = _photo(n)
        w, h = im.size
        s = min(w, h) // 2
        for q, (x, y) in enumerate([(0, 0), (w - s, 0), (0, h - s), (w - s, h - s)]):
            out.append((f"{n}_q{q}", _square(im.crop((x, y, x + s, y + s)), size)))
    return out


def split(size: int) -> tuple[list, list]:
    """(training pool in order, held-out images): training sets of size n are the first n of the first."""
    images = pool(size)
    train = [im for i, im in enumerate(images) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    held = [im for i, im in enumerate(images) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return train, held
