"""Tiny models written to a temp folder, so tests exercise the real loading code without downloads.

The layouts are the ones real users have on disk:

* ``write_tiny_clip(folder)`` writes an open_clip architecture JSON (the format of open_clip's
  ``model_configs/*.json``), a weights file (``torch.save`` of the state dict, like a downloaded
  ``open_clip_pytorch_model.bin``), and a ``local-dir:`` folder (``open_clip_config.json`` with
  ``model_cfg`` + ``preprocess_cfg``, and ``open_clip_model.safetensors``), the layout of the open_clip
  repositories on the Hugging Face hub.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def tiny_clip_config(image_size: int = 32, embed_dim: int = 16) -> dict:
    """An open_clip CLIP config with one 32-wide layer per tower (the package's BPE vocabulary)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


@dataclass
class TinyClip:
    name: str  # the architecture name: the stem of ``config``
    config: Path  # open_clip model config JSON (bare: embed_dim, vision_cfg, text_cfg)
    weights: Path  # torch.save'd state dict
    local_dir: Path  # open_clip_config.json + open_clip_model.safetensors
    model_cfg: dict


def write_tiny_clip(folder: str | Path, *, name: str = "tiny-clip", image_size: int = 32, embed_dim: int = 16,
                    seed: int = 0) -> TinyClip:
    """Write a randomly initialised tiny open_clip model (seeded) in the three layouts; see the module doc."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_clip_config(image_size, embed_dim)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(cfg, indent=2))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    weights = folder / f"{name}.bin"
    torch.save(state, weights)

    local_dir = folder / f"{name}-local"
    local_dir.mkdir(exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (local_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    save_file(state, str(local_dir / "open_clip_model.safetensors"))
    return TinyClip(name=name, config=config, weights=weights, local_dir=local_dir, model_cfg=cfg)


def write_tiny_sd(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline (16 px, offline tokenizer) saved as a local base model."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=tiny_cond_unet(0), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_cond_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
