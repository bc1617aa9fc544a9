"""Train control_tiny_canny: a canny ControlNet for the shipped tiny model, on toy scenes.

    python -m sdbatch.tiny_train.controlnet --out sdbatch/models/tiny_family --minutes 20

Its proof is what the base model cannot do: tiny ignores "left" and "right" in a prompt,
but a ControlNet that has learnt canny edges puts the building where its edges are. So
the captions here never say where the building stands (their position clause is dropped):
the position comes from the edges alone. The ControlNet is diffusers' ``from_unet`` copy of
the frozen tiny UNet's encoder (zero convolutions start it as a no-op), trained on the
UNet's own epsilon loss with the residuals added; the UNet, text encoder and VAE stay as
shipped. The control maps are made as sdbatch makes them at render time (the extension's
canny at a processor resolution of 64, 128 or 512, fitted back to the picture), so every
processor_res a user picks is one the network has seen; every fourth step takes a quarter
batch of 128 px scenes, so a unit in a hires fix pass steers too.

The file is ``ControlNet/control_tiny_canny.safetensors`` in the original ControlNet layout
(what sd-webui-controlnet loads), fp16, with ``controlnet_settings.json`` beside it. As
in train.py: a few steps measure the speed, then the step count is fixed and recorded;
``--steps N`` replays it without a clock, identically on the same machine and threads.
The tiny model it steers must be the one shipped next to it: retrain after tiny changes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdbatch import preprocessors
from sdbatch.tiny_train import scenes
from sdbatch.tiny_train.train import (
    Diffusion,
    clocked_steps,
    load_shipped,
    lr_factor,
    seed_of,
    to_tensor,
    token_ids,
    versions,
)

NAME = "control_tiny_canny"
POSITION_CLAUSES = {"on the left", "on the right", "in the centre", "in the center",
                    "in the middle"}


@dataclass
class ControlNetSettings:
    minutes: float = 20.0
    steps: int = 0  # fixed count: no clock
    seed: int = 0
    threads: int = 2
    pool: int = 4096  # scenes drawn, encoded and edge-mapped once
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 50
    empty: float = 0.3  # empty captions: the edges alone must place the building
    min_snr: float = 5.0
    low: int = 100  # the extension's canny defaults
    high: int = 200
    processor_res: tuple[int, ...] = (64, 128, 512)
    # hires fix runs the units at twice the size: every ``hires_every``-th step draws from a
    # pool of ``hires_size`` scenes, a quarter of the batch (as the tiny UNet was trained)
    hires_every: int = 4
    hires_size: int = 128
    hires_pool: int = 1024
    hint_channels: tuple[int, ...] = field(default=(16, 32, 64, 128))


def caption(scene: scenes.Scene, rng: random.Random) -> str:
    """The scene's caption without its position clause."""
    parts = scenes.caption(scene, rng).split(", ")
    return ", ".join(p for p in parts if p not in POSITION_CLAUSES)


def control_map(image: np.ndarray, res: int, low: int, high: int) -> np.ndarray:
    """The canny map sdbatch hands a 64 px stage for ``image`` at processor_res ``res``."""
    h, w = image.shape[:2]
    edges = preprocessors.canny(image, res, low, high)
    return preprocessors.fit(edges, "crop_and_resize", w, h)


def make_pool(pipe, settings: ControlNetSettings, n_scenes: int, size: int = 64):
    """(latents scaled as the UNet sees them, control maps (N, 3, size, size) in 0..1,
    scenes)."""
    latents, maps, drawn = [], [], []
    rng = np.random.default_rng(seed_of(settings.seed, "controlnet-res", size))
    chunk = 256 * 64 * 64 // (size * size)
    for start in range(0, n_scenes, chunk):
        n = min(chunk, n_scenes - start)
        images, _, sc = scenes.batch(seed_of(settings.seed, "controlnet-pool", size, start), n,
                                     size)
        with torch.no_grad():
            latents.append(pipe.vae.encode(to_tensor(images)).latent_dist.mean
                           * pipe.vae.config.scaling_factor)
        maps.append(np.stack([control_map(im, int(rng.choice(settings.processor_res)),
                                          settings.low, settings.high) for im in images]))
        drawn += sc
    hints = torch.from_numpy(np.concatenate(maps)).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat(latents), hints, drawn


def train(family: Path, out: Path, settings: ControlNetSettings) -> dict:
    from diffusers import ControlNetModel

    from sdbatch.models import ldm_export

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        pipe = load_shipped(family / "tiny")
        for model in (pipe.unet, pipe.text_encoder, pipe.vae):
            model.requires_grad_(False)
        t0 = time.monotonic()
        pools = {False: make_pool(pipe, settings, settings.pool)}
        hires = settings.hires_every > 0 and settings.hires_pool > 0
        if hires:
            pools[True] = make_pool(pipe, settings, settings.hires_pool, settings.hires_size)
        pool_s = round(time.monotonic() - t0, 1)
        print(f"[controlnet] {sum(len(p[2]) for p in pools.values())} scenes and edge maps "
              f"in {pool_s} s", flush=True)
        torch.manual_seed(seed_of(settings.seed, "controlnet-init"))
        cn = ControlNetModel.from_unet(
            pipe.unet, conditioning_embedding_out_channels=settings.hint_channels).train()
        opt = torch.optim.AdamW(cn.parameters(), lr=settings.lr, weight_decay=0.01)
        diffusion = Diffusion(settings.min_snr)
        gen = torch.Generator().manual_seed(seed_of(settings.seed, "controlnet-noise"))
        order = np.random.default_rng(seed_of(settings.seed, "controlnet-order"))
        queues: dict[bool, list[int]] = {False: [], True: []}

        def step(i: int, total: int) -> float:
            big = hires and i % settings.hires_every == settings.hires_every - 1
            latents, hints, drawn = pools[big]
            n = max(1, settings.batch // 4) if big else settings.batch
            while len(queues[big]) < n:
                queues[big] += order.permutation(len(drawn)).tolist()
            idx, queues[big] = queues[big][:n], queues[big][n:]
            rng = random.Random(seed_of(settings.seed, "controlnet-captions", i))
            texts = ["" if rng.random() < settings.empty else caption(drawn[j], rng)
                     for j in idx]
            with torch.no_grad():
                context = pipe.text_encoder(token_ids(pipe.tokenizer, texts)).last_hidden_state
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, diffusion.steps, (len(idx),), generator=gen)
            noisy = diffusion.scheduler.add_noise(x0, noise, t)
            down, mid = cn(noisy, t, encoder_hidden_states=context, controlnet_cond=hints[idx],
                           return_dict=False)
            pred = pipe.unet(noisy, t, context, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
            loss = (diffusion.weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            for g in opt.param_groups:
                g["lr"] = settings.lr * lr_factor(i, total, settings.warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
            opt.step()
            return float(loss.detach())

        total, curve, seconds = clocked_steps("controlnet", step, settings.steps,
                                              settings.minutes, t0)
    finally:
        torch.set_num_threads(threads)
    cn.eval()
    path = ldm_export.save_controlnet(cn, out / "ControlNet" / f"{NAME}.safetensors",
                                      torch.float16)
    record = {
        "command": f"python -m sdbatch.tiny_train.controlnet --family {family} --out {out} "
                   f"--seed {settings.seed} --threads {settings.threads} --pool {settings.pool} "
                   f"--hires-pool {settings.hires_pool} "
                   f"--steps {total}",
        "settings": {**asdict(settings), "steps": total}, "file": str(path.relative_to(out)),
        "bytes": path.stat().st_size, "parameters": sum(p.numel() for p in cn.parameters()),
        "pool_s": pool_s, "seconds": seconds, "loss_curve": curve,
        "tiny_unet_sha256": _unet_hash(family), "versions": versions(),
    }
    (out / "ControlNet" / f"{NAME}.json").write_text(json.dumps(record, indent=2))
    return record


def _unet_hash(family: Path) -> str:
    """Which tiny UNet the ControlNet was trained against (a retrained tiny needs a retrain)."""
    from sdbatch.models.hashing import sha256

    return sha256(family / "tiny" / "unet" / "diffusion_pytorch_model.safetensors")[:12]


def main(argv: list[str] | None = None) -> int:
    from sdbatch.models import tiny

    p = argparse.ArgumentParser(prog="python -m sdbatch.tiny_train.controlnet",
                                description=__doc__.splitlines()[0])
    p.add_argument("--family", type=Path, default=tiny.family_models(),
                   help="the tiny family folder whose tiny/ it steers (default: the shipped)")
    p.add_argument("--out", type=Path, required=True, help="writes ControlNet/ here")
    p.add_argument("--minutes", type=float, default=ControlNetSettings.minutes)
    p.add_argument("--steps", type=int, default=0, help="fixed step count: replays a run")
    p.add_argument("--seed", type=int, default=ControlNetSettings.seed)
    p.add_argument("--threads", type=int, default=ControlNetSettings.threads)
    p.add_argument("--pool", type=int, default=ControlNetSettings.pool)
    p.add_argument("--hires-pool", type=int, default=ControlNetSettings.hires_pool,
                   help="128 px scenes (0: train at 64 px only)")
    args = p.parse_args(argv)
    record = train(args.family, args.out, ControlNetSettings(
        minutes=args.minutes, steps=args.steps, seed=args.seed, threads=args.threads,
        pool=args.pool, hires_pool=args.hires_pool))
    print(f"{record['file']}: {record['settings']['steps']} steps in {record['seconds']} s, "
          f"{record['bytes']} bytes; replay: {record['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
