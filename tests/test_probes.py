"""The sampling-free probes: the loss gap on a tiny UNet that memorizes four real images, its onset on
constructed gap sequences, and Wen et al.'s noise magnitude on a tiny random text-to-image pipeline built
offline (tokenizer files written here, random weights)."""
from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import real_image
from memtrack.probes.loss_gap import (loss_gap, loss_gap_onset, noise_magnitude, noise_magnitude_block,
                             noise_magnitude_trace, spread_timesteps)

torch = pytest.importorskip("torch")

SIZE = 8
TRAIN = ["astronaut", "coffee", "chelsea", "rocket"]
HELDOUT = ["camera", "coins", "grace_hopper", "immunohistochemistry"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- loss gap


def _unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def _train(unet, images, steps: int, snapshot_at: int, seed: int = 0):
    """Plain epsilon-prediction DDPM training, each batch holding every image four times.

    Returns the model after ``snapshot_at`` steps (a copy) and after ``steps``.
    """
    import copy

    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    snapshot = None
    for step in range(steps):
        if step == snapshot_at:
            snapshot = copy.deepcopy(unet)
        x = images.repeat(4, 1, 1, 1)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x),), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return snapshot, unet


@pytest.fixture(scope="module")
def image_sets():
    from memtrack.probes.loss_gap import prepare_images

    return (prepare_images([real_image(n) for n in TRAIN], SIZE),
            prepare_images([real_image(n) for n in HELDOUT], SIZE))


@pytest.fixture(scope="module")
def trained(image_sets):
    """The same initial weights after 10 steps (brief) and after 150 steps (memorizing)."""
    return _train(_unet(), image_sets[0], 150, snapshot_at=10)


def test_spread_timesteps():
    assert spread_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert spread_timesteps(1000, 1) == [500]
    with pytest.raises(ValueError, match="between 1 and 1000"):
        spread_timesteps(1000, 0)


@pytest.mark.slow
def test_memorizing_model_shows_a_larger_gap(image_sets, trained):
    from diffusers import DDPMScheduler

    train, held = image_sets
    brief, memorizing = trained
    sched = DDPMScheduler()
    untrained = loss_gap(_unet(), sched, train, held)
    early = loss_gap(brief, sched, train, held)
    late = loss_gap(memorizing, sched, train, held)
    assert late["timesteps"] == spread_timesteps(1000, 8) and len(late["gap"]) == 8
    assert late["n_train"] == 4 and late["n_heldout"] == 4 and late["prediction_type"] == "epsilon"
    # the memorizing model fits its training images far better than unseen ones ...
    assert late["train_mean"] < late["heldout_mean"]
    assert late["gap_mean"] > 3 * max(early["gap_mean"], untrained["gap_mean"], 1e-3)
    assert late["rel_gap"] > 0.25 > early["rel_gap"]
    # ... most of all at low noise, where a denoiser can recall a training image
    assert late["gap"][0] == max(late["gap"])
    assert late["gap_mean"] == pytest.approx(np.mean(late["heldout"]) - np.mean(late["train"]))


@pytest.mark.slow
def test_loss_gap_is_deterministic_and_leaves_the_model_as_it_was(image_sets, trained):
    from diffusers import DDPMScheduler

    train, held = image_sets
    model = trained[1]
    model.train()
    a = loss_gap(model, DDPMScheduler(), train, held, timesteps=[10, 500, 990], seed=3, batch_size=5)
    b = loss_gap(model, DDPMScheduler(), train, held, timesteps=[10, 500, 990], seed=3, batch_size=64)
    assert model.training
    assert a["timesteps"] == [10, 500, 990]
    np.testing.assert_allclose(a["gap"], b["gap"], rtol=1e-5, atol=1e-7)  # batching changes nothing
    c = loss_gap(model, DDPMScheduler(), train, held, timesteps=[10, 500, 990], seed=4)
    assert c["train"] != a["train"]  # the seed picks the noise


def test_loss_gap_takes_pil_images_and_checks_inputs(image_sets):
    from diffusers import DDPMScheduler

    train, _ = image_sets
    pil = [real_image(n) for n in HELDOUT[:2]]  # full-size photographs: centre-cropped and resized
    out = loss_gap(_unet(), DDPMScheduler(), train, pil, timesteps=2)
    assert out["n_heldout"] == 2 and len(out["gap"]) == 2
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        loss_gap(_unet(), DDPMScheduler(), train, pil, timesteps=[1000])
    with pytest.raises(ValueError, match="one shape"):
        loss_gap(_unet(), DDPMScheduler(), train, torch.zeros(2, 3, 4, 4))


# ---------------------------------------------------------------------------------------- gap onset

STEPS = [100, 200, 300, 400, 500, 600, 700]
HELD = [0.10] * 7


def test_gap_onset_none_while_the_gap_stays_near_its_early_offset():
    # the held-out set is intrinsically 0.02 harder; 10% of the held-out loss (0.01) is the smallest departure
    o = loss_gap_onset(STEPS, [0.020, 0.022, 0.025, 0.021, 0.028, 0.024, 0.029], HELD)
    assert o["step"] is None and o["baseline"] == pytest.approx(0.02) and o["spread"] == 0.0


def test_gap_onset_at_a_lasting_departure():
    gaps = [-0.002, 0.004, 0.006, 0.012, 0.030, 0.050, 0.080]
    o = loss_gap_onset(STEPS, gaps, HELD)
    assert (o["step"], o["between"], o["confirmed"]) == (400, [300, 400], True)
    # steps in any order
    assert loss_gap_onset(STEPS[::-1], gaps[::-1], HELD)["step"] == 400
    # the threshold follows the current held-out loss: with it rising to 0.2, 0.012 is no departure
    assert loss_gap_onset(STEPS, gaps, [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2])["step"] == 500


def test_gap_onset_ignores_a_spike_and_reports_a_late_rise_unconfirmed():
    assert loss_gap_onset(STEPS, [0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0], HELD)["step"] is None
    o = loss_gap_onset(STEPS, [0.0] * 6 + [0.05], HELD)
    assert o["step"] == 700 and not o["confirmed"]


def test_gap_onset_with_a_noisy_multi_point_baseline():
    gaps = [0.00, 0.03, 0.00, 0.02, 0.04, 0.06, 0.08]  # early std 0.014: 3 x std = 0.042 > 10% of 0.1
    o = loss_gap_onset(STEPS, gaps, HELD, baseline_points=3)
    assert o["step"] == 600 and o["baseline"] == 0.0 and o["spread"] == pytest.approx(np.std([0, 0.03, 0]))
    assert loss_gap_onset(STEPS, gaps, HELD)["step"] == 400  # one baseline point: earlier, less cautious


def test_gap_onset_needs_checkpoints_after_the_baseline():
    assert loss_gap_onset([100], [0.0], [0.1])["step"] is None
    with pytest.raises(ValueError, match="baseline_points"):
        loss_gap_onset(STEPS, [0.0] * 7, HELD, baseline_points=0)
    with pytest.raises(ValueError, match="one value per checkpoint"):
        loss_gap_onset(STEPS, [0.0] * 6, HELD)


# ---------------------------------------------------------------------------------- noise magnitude


def _write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer: letters, letter + end-of-word, two merges, the special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    merges = ["t h", "th e</w>"]
    tokens = letters + [c + "</w>" for c in letters] + ["th", "the</w>", "</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    return folder


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """A tiny random StableDiffusionPipeline (latents 4 x 8 x 8; the VAE is never run)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(_write_tokenizer(tmp_path_factory.mktemp("tok")))
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = AutoencoderKL(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=2)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


PROMPTS = ["the cat", "a rocket at dusk", "the coffee cup"]


def test_noise_magnitude_shapes_and_determinism(t2i):
    trace = noise_magnitude_trace(t2i, PROMPTS, num_inference_steps=4, guidance_scale=7.5, seed=0,
                                  num_images_per_prompt=2, batch_size=4)
    assert trace.shape == (3, 2, 4) and (trace > 0).all()
    d = noise_magnitude(t2i, PROMPTS, num_inference_steps=4, guidance_scale=7.5, seed=0, num_images_per_prompt=2,
                        batch_size=1)
    assert d.shape == (3,)
    np.testing.assert_allclose(d, trace.mean(axis=(1, 2)), rtol=1e-5)  # batching changes nothing
    assert not np.allclose(d, noise_magnitude(t2i, PROMPTS, 4, 7.5, seed=1, num_images_per_prompt=2))
    # generation g of prompt p starts from seed + p * num_images_per_prompt + g, whatever is drawn with it
    alone = noise_magnitude_trace(t2i, ["the coffee cup"], 4, 7.5, seed=4, num_images_per_prompt=2)
    np.testing.assert_allclose(alone[0], trace[2], rtol=1e-5)


def test_empty_prompt_has_zero_magnitude(t2i):
    d = noise_magnitude(t2i, ["", "the cat"], num_inference_steps=3, guidance_scale=7.5)
    assert d[0] == pytest.approx(0.0, abs=1e-6) and d[1] > 1e-3


def test_guidance_moves_the_path_not_the_definition(t2i):
    # at the first step x_T is the same whatever the scale, and the difference is not scaled by it
    a = noise_magnitude_trace(t2i, PROMPTS, num_inference_steps=3, guidance_scale=1.0)
    b = noise_magnitude_trace(t2i, PROMPTS, num_inference_steps=3, guidance_scale=7.5)
    np.testing.assert_allclose(a[..., 0], b[..., 0], rtol=1e-5)
    assert not np.allclose(a[..., 1:], b[..., 1:])  # later steps follow a different trajectory
    unet = t2i.unet
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond, uncond = t2i.encode_prompt(PROMPTS[:1], "cpu", 1, True)[:2]
    sched = type(t2i.scheduler).from_config(t2i.scheduler.config)
    sched.set_timesteps(3)
    t = sched.timesteps[0]
    with torch.inference_mode():
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps_u = unet(x, t, encoder_hidden_states=uncond).sample
    assert a[0, 0, 0] == pytest.approx(float((eps_c - eps_u).flatten().norm()), rel=1e-4)


def test_components_without_encode_prompt_give_the_same_values(t2i):
    parts = SimpleNamespace(unet=t2i.unet, text_encoder=t2i.text_encoder, tokenizer=t2i.tokenizer,
                            scheduler=t2i.scheduler, vae=t2i.vae)
    np.testing.assert_allclose(noise_magnitude(parts, PROMPTS, 3, 7.5), noise_magnitude(t2i, PROMPTS, 3, 7.5),
                               rtol=1e-5)


def test_noise_magnitude_block_ranks_prompts():
    block = noise_magnitude_block(["a", "b", "c", "d"], [0.5, 2.0, 1.0, 2.0], top=3)
    assert [t["prompt"] for t in block["top"]] == ["b", "d", "c"]
    assert [t["rank"] for t in block["top"]] == [1, 2, 3]
    assert block["n"] == 4 and block["max"] == 2.0 and block["mean"] == pytest.approx(1.375)
    with pytest.raises(ValueError, match="one magnitude per prompt"):
        noise_magnitude_block(["a"], [1.0, 2.0])
