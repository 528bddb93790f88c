"""A tiny unconditional DDPM trainer shaped like diffusers' train_unconditional.py.

(``examples/unconditional_image_generation/train_unconditional.py`` in huggingface/diffusers.)

It keeps the parts memtrack meets in real runs: an ``Accelerator`` with a ``ProjectConfiguration``
(tensorboard logs in ``output_dir/logging_dir``), save/load-state hooks that ``save_pretrained`` the
UNet into ``unet/`` (and the EMA weights into ``unet_ema/`` with ``--use_ema``), ``checkpoint-{global_step}``
folders written by ``accelerator.save_state`` on the main process every ``--checkpointing_steps``,
``--checkpoints_total_limit`` pruning that parses ``int(name.split("-")[1])`` of every ``checkpoint*``
entry, and a final ``DDPMPipeline`` saved in ``output_dir``. Images are read from a plain folder of PNGs.

Test-only flags: ``--step_sleep`` (seconds per step, to give a sidecar time), ``--crash_at_step`` and
``--crash_exit_code`` (a script that dies), ``--timing_file`` (the benchmark reads the loop's wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="tiny DDPM trainer (test fixture)")
    p.add_argument("--train_data_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=6)
    p.add_argument("--checkpointing_steps", type=int, default=2)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--ema_decay", type=float, default=0.9)
    p.add_argument("--ddpm_num_steps", type=int, default=1000)
    p.add_argument("--ddpm_beta_schedule", type=str, default="linear")
    p.add_argument("--logger", type=str, default="tensorboard", choices=["tensorboard", "none"])
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step_sleep", type=float, default=0.0)
    p.add_argument("--crash_at_step", type=int, default=None)
    p.add_argument("--crash_exit_code", type=int, default=3)
    p.add_argument("--timing_file", type=str, default=None, help="write the training loop's wall time (JSON)")
    return p.parse_args(argv)


def load_images(folder: str, size: int) -> torch.Tensor:
    files = sorted(Path(folder).glob("*.png"))
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1.0
              for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tiny_unet(size: int):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def prune_checkpoints(output_dir: str, limit: int) -> None:
    """Exactly what the example scripts do before saving a new checkpoint."""
    checkpoints = [d for d in os.listdir(output_dir) if d.startswith("checkpoint")]
    checkpoints = sorted(checkpoints, key=lambda x: int(x.split("-")[1]))
    if len(checkpoints) >= limit:
        for name in checkpoints[: len(checkpoints) - limit + 1]:
            shutil.rmtree(os.path.join(output_dir, name))


def main(args) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.training_utils import EMAModel

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(log_with=None if args.logger == "none" else args.logger,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=logging_dir))
    set_seed(args.seed)
    model = tiny_unet(args.resolution)
    ema_model = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=type(model),
                         model_config=model.config) if args.use_ema else None

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if args.use_ema:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for m in models:
                m.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    def load_model_hook(models, input_dir):
        for _ in range(len(models)):
            m = models.pop()
            loaded = type(m).from_pretrained(input_dir, subfolder="unet")
            m.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule)
    data = load_images(args.train_data_dir, args.resolution)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.train_batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if accelerator.is_main_process and args.logger != "none":
        accelerator.init_trackers("train_tiny")

    t0, c0 = time.perf_counter(), time.process_time()
    global_step = 0
    epochs = math.ceil(args.max_train_steps / max(len(loader), 1))
    for _ in range(epochs):
        model.train()
        for (clean,) in loader:
            noise = torch.randn_like(clean)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
            with accelerator.accumulate(model):
                loss = F.mse_loss(model(scheduler.add_noise(clean, noise, t), t).sample, noise)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_model.step(model.parameters())
                global_step += 1
                if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                    if args.checkpoints_total_limit is not None:
                        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
                    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
                if args.crash_at_step is not None and global_step == args.crash_at_step:
                    print(f"train_tiny: crashing at step {global_step}", file=sys.stderr, flush=True)
                    sys.exit(args.crash_exit_code)
                time.sleep(args.step_sleep)
            accelerator.log({"loss": loss.detach().item()}, step=global_step)
            if global_step >= args.max_train_steps:
                break
        accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        if args.use_ema:
            ema_model.copy_to(unet.parameters())
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.output_dir)
    accelerator.end_training()
    if args.timing_file and accelerator.is_main_process:
        Path(args.timing_file).write_text(json.dumps({"train_s": time.perf_counter() - t0,
                                                      "train_cpu_s": time.process_time() - c0, "steps": global_step}))


if __name__ == "__main__":
    main(parse_args())
