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
