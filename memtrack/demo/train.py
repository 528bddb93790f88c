"""The demo's training set and training run: a tiny DDPM that memorizes a handful of real images.

Everything here works offline. :func:`build_demo_dataset` writes real photographs that installed packages
ship (scikit-image's ``skimage.data`` and matplotlib's ``grace_hopper.jpg``) as an HF ``imagefolder`` with
captions and identity labels: two face crops each of Eileen Collins (``astronaut``) and Grace Hopper, plus
four non-face images. :func:`train_demo` trains a small ``UNet2DModel`` on them the way diffusers'
``examples/unconditional_image_generation/train_unconditional.py`` does -- ``accelerate.Accelerator``, a
save-state pre-hook that writes ``checkpoint-N/unet`` (and ``unet_ema``) with ``save_pretrained``, and the
final ``DDPMPipeline`` in the output folder -- so memtrack meets the same folder layout a real run leaves.

:data:`RECIPE` holds the settings tuned so that, on a 2-core CPU, the d1/d2 < 1/3 rate (Gu et al. 2023) is
0 at the first checkpoint and clearly above it at the last, within a few minutes of training.

Example:
    >>> from pathlib import Path
    >>> from memtrack.demo.train import RECIPE, build_demo_dataset, train_demo
    >>> data = build_demo_dataset(Path("demo/data"), RECIPE["train"]["resolution"])
    >>> checkpoints = train_demo(data, Path("demo/run"), **RECIPE["train"])
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from memtrack.data.dataset import open_image, read_dataset
from memtrack.errors import CheckpointError, ConfigError, DataError, DependencyError
from memtrack.utils import atomic_path, atomic_write_text, get_logger, progress_bar

logger = get_logger(__name__)

#: Tuned defaults. ``train`` holds :func:`train_demo`'s keyword arguments; ``sampling`` what the demo's
#: evaluation should use (DDIM, sample i seeded ``seed + i``).
RECIPE: dict = {
    "train": {
        "resolution": 32,
        "max_steps": 3000,
        "checkpointing_steps": 375,
        "batch_size": 8,
        "lr": 2e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 50,
        "use_ema": True,
        "ema_decay": 0.995,
        "seed": 0,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_levels": (1,),
    },
    "sampling": {"num_samples": 64, "num_inference_steps": 25, "scheduler": "ddim", "seed": 0},
}

# --------------------------------------------------------------------------------------------- dataset

# Face crops as (centre x, centre y, side, angle in radians) in the source photograph. The first crop of
# each person is dlib's aligned 5-landmark face chip (padding 0.25), measured once so that building the
# demo needs no face detector; the second is shifted by a few percent, 12% wider and turned by 0.12 rad --
# the same person (dlib distance ~0.35 at 32 px) but far apart in pixels (RMS ~0.24), so an exact copy of
# one crop still passes the nearest-neighbour ratio test.
_FACES = {
    "Eileen Collins": ("astronaut", "astronaut Eileen Collins", [(224.8, 125.5, 120.9, 0.048),
                                                                 (232.1, 129.1, 135.4, -0.072)]),
    "Grace Hopper": ("grace_hopper", "computer scientist Grace Hopper", [(270.3, 234.6, 234.4, -0.096),
                                                                         (284.4, 241.6, 262.5, -0.216)]),
}
# Non-face images: skimage.data function name -> caption.
_SCENES = {
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad at dusk",
    "camera": "a black-and-white photo of a cameraman",
}


def _source_image(name: str) -> Image.Image:
    """A sample photograph shipped with scikit-image or (``grace_hopper``) matplotlib, as RGB."""
    if name == "grace_hopper":
        from matplotlib import cbook

        return open_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    try:
        from skimage import data as skdata
    except ImportError:
        raise DependencyError("the demo's training images come from scikit-image, which is not installed",
                              hint="pip install 'memtrack[demo]'") from None
    return Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB")


def _rotated_crop(image: Image.Image, box: tuple, size: int) -> Image.Image:
    """The square ``box = (cx, cy, side, angle)`` of ``image``, rotated upright, at ``size`` pixels.

    Sampled at 4x and downscaled with a Lanczos filter, so a 32-px face is anti-aliased, not aliased.
    """
    cx, cy, side, angle = box
    big = 4 * size
    scale, cos, sin = side / big, math.cos(angle), math.sin(angle)
    # output pixel (u, v) -> source (x, y) = centre + R(angle) @ ((u, v) * scale - side / 2)
    x0 = cx - side / 2 * (cos - sin)
    y0 = cy - side / 2 * (sin + cos)
    coeffs = (scale * cos, -scale * sin, x0, scale * sin, scale * cos, y0)
    chip = image.transform((big, big), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
    return chip.resize((size, size), Image.Resampling.LANCZOS)


def _centre_square(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def build_demo_dataset(out_dir: Path, resolution: int) -> Path:
    """Write the demo training set: 8 real photographs as ``resolution`` x ``resolution`` PNGs.

    The folder follows the HF ``imagefolder`` layout: the PNGs plus ``metadata.jsonl`` with ``file_name``,
    ``text`` (a caption) and, for the four face crops, ``identity``. Nothing is downloaded: the images
    ship with scikit-image and matplotlib. Running it again rewrites the same files.

    Args:
        out_dir: the folder to write (created if missing).
        resolution: side of the square images in pixels (>= 8).

    Returns:
        ``out_dir``.
    """
    if resolution < 8:
        raise DataError(f"resolution must be >= 8 pixels, got {resolution}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for identity, (source, caption, boxes) in _FACES.items():
        photo = _source_image(source)
        slug = identity.lower().replace(" ", "_")
        for i, box in enumerate(boxes, 1):
            rows.append(_write_png(out_dir, f"{slug}_{i}.png", _rotated_crop(photo, box, resolution),
                                   {"text": f"a close-up portrait of {caption}", "identity": identity}))
    for name, caption in _SCENES.items():
        rows.append(_write_png(out_dir, f"{name}.png", _centre_square(_source_image(name), resolution),
                               {"text": caption}))
    atomic_write_text(out_dir / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def _write_png(folder: Path, file_name: str, image: Image.Image, fields: dict) -> dict:
    with atomic_path(folder / file_name) as tmp:
        image.save(tmp, format="PNG")
    return {"file_name": file_name, **fields}


# -------------------------------------------------------------------------------------------- training


def build_unet(resolution: int, block_out_channels: tuple = (16, 32, 64), layers_per_block: int = 1,
               norm_num_groups: int = 8, attention_levels: tuple = ()):
    """A small ``UNet2DModel``: self-attention in the middle block, and at the ``attention_levels`` given.

    ``attention_levels`` indexes ``block_out_channels`` (0 = full resolution). ``norm_num_groups`` must
    divide every channel count. ``(4, 8)``-style channels make test-sized models.
    """
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    down = ["AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if levels - 1 - i in attention_levels else "UpBlock2D" for i in range(levels)]
    if any(c % norm_num_groups for c in block_out_channels):
        raise ConfigError(f"norm_num_groups {norm_num_groups} must divide every block_out_channels entry, "
                          f"got {tuple(block_out_channels)}")
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=layers_per_block,
                       block_out_channels=tuple(block_out_channels), down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=norm_num_groups)


def demo_scheduler():
    """The noise schedule the demo trains with (the script's defaults): 1000 linear-beta steps, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def _training_tensors(data_dir: Path, resolution: int, progress: bool):
    """The training images as one ``[n, 3, r, r]`` tensor in [-1, 1], preprocessed like the script.

    Resize the shorter side (bilinear), centre-crop, no horizontal flip -- the demo wants exact copies.
    """
    import torch
    from torchvision import transforms

    dataset = read_dataset(data_dir, show_progress=progress)
    augment = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    return torch.stack([augment(open_image(r.path)) for r in dataset.records])


def _save_hook(accelerator, ema) -> Callable:
    """``save_state`` pre-hook: write the unet (and its EMA) as diffusers folders, not accelerate blobs."""

    def save_model_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        if ema is not None:
            ema.save_pretrained(str(Path(output_dir) / "unet_ema"))
        for model in models:
            model.save_pretrained(str(Path(output_dir) / "unet"))
            weights.pop()  # saved above; keep accelerate from writing it again as model.safetensors

    return save_model_hook


def _refuse_existing_checkpoints(output_dir: Path) -> None:
    old = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    if old:
        listed = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
        raise CheckpointError(f"{output_dir} already holds checkpoints ({listed}); a new run would mix with them",
                              hint="choose an empty output folder or delete the old run first")


def train_demo(data_dir: Path, output_dir: Path, *, max_steps: int, checkpointing_steps: int, resolution: int,
               batch_size: int, lr: float, use_ema: bool, ema_decay: float, seed: int,
               lr_scheduler: str = "constant_with_warmup", lr_warmup_steps: int = 0,
               block_out_channels: tuple = (16, 32, 64), layers_per_block: int = 1, norm_num_groups: int = 8,
               attention_levels: tuple = (), progress: bool = True) -> list[Path]:
    """Train the demo DDPM on CPU, saving ``checkpoint-N`` folders the way diffusers' scripts do.

    Every ``checkpointing_steps`` optimizer steps, ``accelerator.save_state(output_dir/"checkpoint-N")``
    runs; its pre-hook writes ``unet/`` (and ``unet_ema/`` with EMA) via ``save_pretrained``, then
    accelerate writes the optimizer, scheduler and ``random_states_0.pkl``. At the end the final
    ``DDPMPipeline`` (EMA weights when EMA is on) is saved in ``output_dir``. Same seed, same weights.

    Each batch holds every training image ``batch_size / n`` times (shuffled), so few images train fast.

    Args:
        data_dir: a folder :func:`memtrack.data.dataset.read_dataset` reads (e.g. :func:`build_demo_dataset`'s).
        output_dir: the run folder; must not hold ``checkpoint-*`` folders already.
        max_steps: optimizer steps to train.
        checkpointing_steps: save a checkpoint every this many steps.
        resolution: image side in pixels (the UNet's ``sample_size``).
        batch_size: images per step.
        lr: AdamW's peak learning rate.
        lr_scheduler, lr_warmup_steps: the learning-rate schedule, a name ``diffusers.optimization.get_scheduler``
            knows (the script's ``--lr_scheduler``: constant_with_warmup, cosine, linear, ...).
        use_ema: keep diffusers' ``EMAModel`` of the weights, saved as ``unet_ema/``.
        ema_decay: the EMA's maximum decay.
        seed: seeds the weights, the batch order, the noise and the timesteps.
        block_out_channels, layers_per_block, norm_num_groups, attention_levels: the UNet (see :func:`build_unet`).
        progress: show a progress bar (steps, rate, loss).

    Returns:
        The checkpoint folders, in step order.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    for name, value in (("max_steps", max_steps), ("checkpointing_steps", checkpointing_steps),
                        ("batch_size", batch_size)):
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    output_dir = Path(output_dir)
    _refuse_existing_checkpoints(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # 1. the accelerator, seeds, model, EMA, noise schedule and optimizer, as in train_unconditional.py
    accelerator = Accelerator(cpu=True)
    set_seed(seed)
    model = build_unet(resolution, block_out_channels, layers_per_block, norm_num_groups, attention_levels)
    ema = EMAModel(model.parameters(), decay=ema_decay, model_cls=type(model), model_config=model.config) if use_ema else None
    accelerator.register_save_state_pre_hook(_save_hook(accelerator, ema))
    noise_scheduler = demo_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-6)
    schedule = get_scheduler(lr_scheduler, optimizer=optimizer, num_warmup_steps=lr_warmup_steps,
                             num_training_steps=max_steps)

    # 2. the data: the images repeated so that a batch can hold each of them several times
    images = _training_tensors(Path(data_dir), resolution, progress)
    repeats = max(1, math.ceil(batch_size / len(images)))
    loader = torch.utils.data.DataLoader(images.repeat(repeats, 1, 1, 1), batch_size=batch_size, shuffle=True,
                                         drop_last=True)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)

    # 3. the loop: noise, predict it, step; checkpoint every checkpointing_steps
    checkpoints: list[Path] = []
    bar = progress_bar(total=max_steps, desc="training demo DDPM", unit="step", disable=None if progress else True)
    step = 0
    model.train()
    while step < max_steps:
        for clean in loader:
            loss = _train_step(model, clean, noise_scheduler, optimizer, schedule, accelerator)
            if ema is not None:
                ema.step(model.parameters())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if step % checkpointing_steps == 0 and accelerator.is_main_process:
                # EMAModel.save_pretrained builds a fresh model (drawing random init weights): fork the RNG so
                # the run is the same whatever the checkpoint cadence
                with torch.random.fork_rng():
                    accelerator.save_state(str(output_dir / f"checkpoint-{step}"))
                checkpoints.append(output_dir / f"checkpoint-{step}")
            if step >= max_steps:
                break
    bar.close()

    # 4. the final pipeline, with the EMA weights swapped in as the script does
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        if ema is not None:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(str(output_dir))
        if ema is not None:
            ema.restore(unet.parameters())
    accelerator.end_training()
    return checkpoints


def _train_step(model, clean, noise_scheduler, optimizer, lr_scheduler, accelerator) -> float:
    """One denoising step: epsilon-prediction MSE at uniformly drawn timesteps; returns the loss."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(clean.shape, device=clean.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                              device=clean.device).long()
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    with accelerator.accumulate(model):
        loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss.detach().item()
