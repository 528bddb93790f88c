"""Sampling-free memorization probes that read the model itself: the loss gap and the noise magnitude.

* :func:`loss_gap` -- the denoising loss on training images versus held-out images at fixed noise and
  fixed timesteps. Favero, Sclocchi & Wyart 2025 and Bonnaire et al. 2025 report that the held-out loss
  departs from the training loss at the memorization time; :func:`loss_gap_onset` dates the departure.
  A few batched forward passes, cheap enough for every logging step (``benchmarks/loss_gap_cost.py``).
* :func:`noise_magnitude` -- Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in
  Diffusion Models": for a text-to-image model, the mean over sampling steps of
  ``||eps(x_t, prompt) - eps(x_t, empty prompt)||_2``; memorized prompts give large values from the first
  step. :func:`noise_magnitude_block` ranks the captions and summarises the distribution per checkpoint.

The probes take model objects and tensors or images and touch no files; torch and diffusers are imported
only when a probe runs. :func:`loss_gap_onset`, :func:`spread_timesteps` and :func:`noise_magnitude_block`
are pure.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np

from memtrack.detectors.core import summarise

# ----------------------------------------------------------------------------------------- loss gap


def spread_timesteps(num_train_timesteps: int, k: int) -> list[int]:
    """``k`` timesteps spread over the schedule: the midpoints of ``k`` equal bins of ``[0, T)``.

    ``spread_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]``.
    """
    if k < 1 or k > num_train_timesteps:
        raise ValueError(f"timesteps must be between 1 and {num_train_timesteps}, got {k}")
    return [int((j + 0.5) * num_train_timesteps / k) for j in range(k)]


def prepare_images(images, size: int):
    """``[n, C, H, W]`` float32 in [-1, 1]: tensors pass through; PIL images / uint8 arrays are converted.

    Images are centre-cropped to a square and resized (bilinear) to ``size`` -- what diffusers'
    ``train_unconditional.py`` does (Resize, CenterCrop, Normalize([0.5], [0.5])). Convert once and pass
    the tensors when the probe runs at every logging step.
    """
    import torch
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensors must be [n, C, H, W] in [-1, 1]; got shape {tuple(images.shape)}")
        return images.float()
    out = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(a).permute(2, 0, 1))
    if not out:
        raise ValueError("loss_gap needs at least one image in each set")
    return torch.stack(out)


def _target(scheduler, clean, noise, t):
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, t)
    if kind == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {kind!r}; expected epsilon, v_prediction or sample")


def _denoising_losses(unet, scheduler, images, noise, steps: list[int], batch_size: int) -> np.ndarray:
    """``[len(steps), n]`` per-image MSE of the model's prediction at each timestep (fixed ``noise``)."""
    import torch

    p = next(unet.parameters())
    n = images.shape[0]
    pairs = [(j, i) for j in range(len(steps)) for i in range(n)]
    out = np.empty((len(steps), n), dtype=np.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        js = torch.tensor([j for j, _ in chunk])
        idx = torch.tensor([i for _, i in chunk])
        clean, eps = images[idx], noise[js, idx]
        t = torch.tensor([steps[j] for j, _ in chunk], dtype=torch.long)
        noisy = scheduler.add_noise(clean, eps, t)
        pred = unet(noisy.to(p.device, p.dtype), t.to(p.device)).sample.float().cpu()
        err = (pred - _target(scheduler, clean, eps, t)) ** 2
        out[js.numpy(), idx.numpy()] = err.flatten(1).mean(1).double().numpy()
    return out


def loss_gap(unet, scheduler, train_images, heldout_images, timesteps: int | Sequence[int] = 8, seed: int = 0,
             batch_size: int = 64) -> dict:
    """The denoising loss on training vs held-out images, per timestep, at fixed noise.

    For each timestep t in a fixed set spread over the schedule and each image x0, the model's loss
    ``mean((model(x_t, t) - target)^2)`` with ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and the target
    of the scheduler's ``prediction_type`` (eps, v or x0) -- the training objective, evaluated without
    its randomness: ``eps`` is drawn once from a CPU generator seeded with ``seed``, and the i-th training
    and the i-th held-out image get the *same* noise at each timestep (common random numbers: the gap
    reflects the images, not the draw). Same inputs, same numbers, at every checkpoint.

    The gap is held-out minus train: ~0 (up to the two sets' intrinsic difference) while the model
    generalises, growing once it fits the training images better than unseen ones.

    Args:
        unet: an unconditional denoiser called as ``unet(x_t, t).sample`` (``UNet2DModel``); used on its
            own device and dtype, in eval mode for the call (its mode is restored).
        scheduler: the training noise schedule (``DDPMScheduler``-like: ``add_noise``, ``config``).
        train_images, heldout_images: ``[n, C, H, W]`` tensors in [-1, 1], or PIL images / uint8 arrays
            (centre-cropped and resized to ``unet.config.sample_size``).
        timesteps: how many timesteps to spread over the schedule (:func:`spread_timesteps`), or the
            timesteps themselves.
        seed: seeds the fixed noise.
        batch_size: (image, timestep) pairs per forward pass.

    Returns:
        ``{"timesteps": [int], "train": [float], "heldout": [float], "gap": [float]`` (per timestep, mean
        over images), ``"train_mean", "heldout_mean", "gap_mean"`` (means over timesteps), ``"rel_gap"``
        (``gap_mean / heldout_mean``), ``"n_train", "n_heldout", "seed", "prediction_type"}``.

    Example:
        >>> gap = loss_gap(unet, DDPMScheduler(), train[:32], heldout[:32])
        >>> gap["gap_mean"]
    """
    import torch

    n_t = int(scheduler.config.num_train_timesteps)
    steps = spread_timesteps(n_t, timesteps) if isinstance(timesteps, int) else [int(t) for t in timesteps]
    if not steps or min(steps) < 0 or max(steps) >= n_t:
        raise ValueError(f"timesteps must lie in [0, {n_t}); got {steps}")
    size = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    train, held = prepare_images(train_images, size), prepare_images(heldout_images, size)
    if train.shape[1:] != held.shape[1:]:
        raise ValueError(f"training images {tuple(train.shape[1:])} and held-out images {tuple(held.shape[1:])} "
                         "must have one shape")
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((len(steps), max(len(train), len(held)), *train.shape[1:]), generator=gen)
    was_training = unet.training
    unet.eval()
    try:
        with torch.inference_mode():
            lt = _denoising_losses(unet, scheduler, train, noise, steps, batch_size).mean(axis=1)
            lh = _denoising_losses(unet, scheduler, held, noise, steps, batch_size).mean(axis=1)
    finally:
        unet.train(was_training)
    gap = lh - lt
    return {"timesteps": steps, "train": lt.tolist(), "heldout": lh.tolist(), "gap": gap.tolist(),
            "train_mean": float(lt.mean()), "heldout_mean": float(lh.mean()), "gap_mean": float(gap.mean()),
            "rel_gap": float(gap.mean() / lh.mean()) if lh.mean() > 0 else 0.0,
            "n_train": int(len(train)), "n_heldout": int(len(held)), "seed": int(seed),
            "prediction_type": scheduler.config.get("prediction_type", "epsilon")}


def loss_gap_onset(steps: Sequence[int], gaps: Sequence[float], heldout: Sequence[float], *,
                   baseline_points: int = 1, k: float = 3.0, rel_threshold: float = 0.1,
                   persistence: int = 2) -> dict:
    """When the held-out loss departs from the training loss.

    Two different image sets have somewhat different losses even under a model that generalises, so the
    gap is measured from a baseline: the first ``baseline_points`` checkpoints (early training, before
    memorization) give ``baseline`` = the median of their gaps and ``spread`` = their standard deviation
    (0 for one checkpoint). At a later checkpoint s the gap has *departed* when

        ``gap_s > baseline + max(k * spread, rel_threshold * heldout_s)``

    -- the held-out loss exceeds the training loss by more than ``rel_threshold`` of itself (default
    10%) beyond the early offset, and by more than the early noise. The onset is the first checkpoint
    after the baseline window that departs there and at each of the next ``persistence`` checkpoints;
    one at the very end with fewer checkpoints after it is reported with ``"confirmed": False``, and a
    departure that falls back is not an onset, as in :func:`memtrack.analysis.dynamics.onset`.

    The baseline checkpoints must precede memorization: evaluate the probe from early in training (it
    is cheap enough for every logging step). When the gap is already large at the first checkpoint no
    onset can be dated (``step`` None).

    Args:
        steps: checkpoint steps (any order; sorted here).
        gaps: held-out minus train loss at each step (``loss_gap(...)["gap_mean"]``, or one timestep's gap).
        heldout: the held-out loss at each step (``"heldout_mean"``, or that timestep's).
        baseline_points: early checkpoints that define the baseline (>= 1).
        k: how many early standard deviations a departure must also exceed (with >= 2 baseline points).
        rel_threshold: the smallest departure, as a fraction of the current held-out loss.
        persistence: further checkpoints the gap must stay departed.

    Returns:
        ``{"step": int | None, "between": [int, int] | None, "confirmed": bool, "baseline": float | None,
        "spread": float | None, "rule": str}``.

    Example:
        >>> runs = [loss_gap(unet_at[s], sched, train, held) for s in steps]
        >>> loss_gap_onset(steps, [r["gap_mean"] for r in runs], [r["heldout_mean"] for r in runs])["step"]
    """
    if baseline_points < 1:
        raise ValueError(f"baseline_points must be >= 1, got {baseline_points}")
    if not (len(steps) == len(gaps) == len(heldout)):
        raise ValueError("steps, gaps and heldout need one value per checkpoint")
    order = sorted(range(len(steps)), key=lambda i: int(steps[i]))
    s = [int(steps[i]) for i in order]
    g = np.asarray([gaps[i] for i in order], dtype=np.float64)
    h = np.asarray([heldout[i] for i in order], dtype=np.float64)
    rule = (f"gap > baseline + max({k:g} x spread, {rel_threshold:g} x held-out loss), baseline from the first "
            f"{baseline_points} checkpoint(s), for {persistence} more")
    none = {"step": None, "between": None, "confirmed": False, "baseline": None, "spread": None, "rule": rule}
    if len(s) <= baseline_points:
        return none
    base, spread = float(np.median(g[:baseline_points])), float(np.std(g[:baseline_points]))
    above = g > base + np.maximum(k * spread, rel_threshold * np.abs(h))
    for i in range(baseline_points, len(s)):
        following = above[i + 1:i + 1 + persistence]
        if above[i] and following.all():
            return {"step": s[i], "between": [s[i - 1], s[i]], "confirmed": len(following) == persistence,
                    "baseline": base, "spread": spread, "rule": rule}
    return {**none, "baseline": base, "spread": spread}


# ----------------------------------------------------------------------------------- noise magnitude


def _encode(pipeline, prompts: list[str], device):
    """``(cond, uncond)`` text embeddings; the unconditional one is the empty prompt, as in Wen et al."""
    import torch

    if hasattr(pipeline, "encode_prompt"):
        cond, uncond = pipeline.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=None)[:2]
        return cond, uncond
    tok, enc = pipeline.tokenizer, pipeline.text_encoder

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = ids.attention_mask.to(device) if getattr(enc.config, "use_attention_mask", False) else None
        with torch.inference_mode():
            return enc(ids.input_ids.to(device), attention_mask=mask)[0]

    return embed(prompts), embed([""] * len(prompts))


def _latent_shape(pipeline, height: int | None, width: int | None) -> tuple[int, int, int]:
    unet = pipeline.unet
    factor = getattr(pipeline, "vae_scale_factor", None)
    if factor is None:
        vae = getattr(pipeline, "vae", None)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    size = unet.config.sample_size
    h = height // factor if height else (size if isinstance(size, int) else size[0])
    w = width // factor if width else (size if isinstance(size, int) else size[1])
    return int(unet.config.in_channels), int(h), int(w)


def noise_magnitude_trace(pipeline, prompts: Sequence[str], num_inference_steps: int = 50,
                          guidance_scale: float = 7.5, seed: int = 0, num_images_per_prompt: int = 1,
                          batch_size: int = 8, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Per prompt, generation and sampling step: ``||eps(x_t, e_p) - eps(x_t, e_empty)||_2``.

    The trajectory is the pipeline's own guided sampling (Wen et al.'s setting): from
    ``x_T`` = noise of a CPU generator seeded ``seed + i`` for generation ``i = prompt_index *
    num_images_per_prompt + g`` (memtrack's seed plan), each step predicts the noise with the prompt and
    with the empty prompt in one batch, records the L2 norm of their difference over the whole latent
    (all channels and pixels), and steps the scheduler with the guided prediction
    ``eps_empty + guidance_scale * (eps_p - eps_empty)``. ``guidance_scale`` changes the path ``x_t``, never
    the recorded quantity (the difference is not scaled by it); at the first step, before the path
    depends on it, the value is the same for every scale.

    Args:
        pipeline: a ``StableDiffusionPipeline``-like object (SD 1.x / 2.x: the UNet takes only
            ``encoder_hidden_states``): ``unet`` (``UNet2DConditionModel``), ``scheduler``, and either
            ``encode_prompt`` or ``tokenizer`` + ``text_encoder``; ``vae`` is only used for its scale factor
            (the latents are never decoded). For a v-prediction model the compared outputs are v, not eps.
        prompts: the prompts (training captions).
        num_inference_steps: sampling steps (the pipeline's scheduler, copied, so its state is untouched).
        guidance_scale: the classifier-free guidance scale of the trajectory.
        seed: base seed of the fixed noise.
        num_images_per_prompt: generations per prompt.
        batch_size: generations per forward pass (each pass runs 2 x batch_size UNet rows).
        height, width: image size in pixels (default: the UNet's ``sample_size`` in latent pixels).

    Returns:
        ``[n_prompts, num_images_per_prompt, num_inference_steps]`` float64.
    """
    import torch

    prompts = list(prompts)
    unet = pipeline.unet
    p = next(unet.parameters())
    shape = _latent_shape(pipeline, height, width)
    items = [(pi, g) for pi in range(len(prompts)) for g in range(num_images_per_prompt)]
    out = np.zeros((len(prompts), num_images_per_prompt, num_inference_steps), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            gens = [torch.Generator("cpu").manual_seed(int(seed) + pi * num_images_per_prompt + g) for pi, g in chunk]
            cond, uncond = _encode(pipeline, [prompts[pi] for pi, _ in chunk], p.device)
            norms = _guided_norms(unet, pipeline.scheduler, cond.to(p.dtype), uncond.to(p.dtype), gens, shape,
                                  num_inference_steps, guidance_scale)
            for row, (pi, g) in enumerate(chunk):
                out[pi, g] = norms[row]
    return out


def _guided_norms(unet, scheduler, cond, uncond, gens, shape, num_inference_steps, guidance_scale) -> np.ndarray:
    """``[batch, steps]`` norms along the guided trajectory of one batch."""
    import torch

    p = next(unet.parameters())
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps, device=p.device)
    x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(p.device, p.dtype)
    x = x * sched.init_noise_sigma
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    context = torch.cat([uncond, cond])
    norms = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
        diff = (eps_c - eps_u).float()
        norms.append(diff.flatten(1).norm(dim=1).cpu().double().numpy())
        x = sched.step(eps_u + guidance_scale * (eps_c - eps_u), t, x, **step_kwargs).prev_sample
    return np.stack(norms, axis=1)


def noise_magnitude(pipeline, prompts: Sequence[str], num_inference_steps: int = 50, guidance_scale: float = 7.5,
                    seed: int = 0, num_images_per_prompt: int = 1, batch_size: int = 8,
                    height: int | None = None, width: int | None = None) -> np.ndarray:
    """Wen et al.'s text-conditional noise magnitude per prompt (ICLR 2024).

    ``d = (1 / T) sum_t ||eps(x_t, e_p) - eps(x_t, e_empty)||_2`` over the ``T`` sampling steps of the
    guided trajectory, averaged over the ``num_images_per_prompt`` generations (their detection code
    averages over generations, then over steps). High ``d`` marks a memorized prompt (AUC 0.960 on
    Stable Diffusion v1.4 in their paper). See :func:`noise_magnitude_trace` for the trajectory, the
    noise and the arguments.

    Returns:
        ``[n_prompts]`` float64.

    Example:
        >>> d = noise_magnitude(pipe, captions, num_inference_steps=50, guidance_scale=7.5, seed=0)
        >>> noise_magnitude_block(captions, d)["top"][0]
    """
    trace = noise_magnitude_trace(pipeline, prompts, num_inference_steps, guidance_scale, seed,
                                  num_images_per_prompt, batch_size, height, width)
    return trace.mean(axis=(1, 2))


def noise_magnitude_block(prompts: Sequence[str], magnitudes: Sequence[float], top: int = 10) -> dict:
    """One checkpoint's noise magnitudes as a report block: the distribution and the top-ranked prompts.

    Returns:
        ``{"n", "mean", "p50", "p75", "p90", "p95", "p99", "max", "top": [{"rank", "prompt", "magnitude"}]}``;
        ranks are by decreasing magnitude (ties keep the prompts' order).
    """
    m = np.asarray(magnitudes, dtype=np.float64)
    if len(prompts) != len(m):
        raise ValueError(f"one magnitude per prompt: {len(prompts)} prompts, {len(m)} magnitudes")
    order = sorted(range(len(m)), key=lambda i: (-m[i], i))
    block = summarise(m)
    block["max"] = float(m.max()) if m.size else float("nan")
    block["top"] = [{"rank": r + 1, "prompt": prompts[i], "magnitude": float(m[i])} for r, i in enumerate(order[:top])]
    return block
