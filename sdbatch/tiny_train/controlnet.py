"""Train control_tiny_canny: a canny ControlNet for the tiny model, on toy scenes.

It is tiny_train's last part (``python -m sdbatch.tiny_train``: its share of the budget,
``--steps controlnet=N``), trained against the tiny/ that run has just saved. On its own,

    python -m sdbatch.tiny_train.controlnet --out DIR --minutes 18

retrains only it against an existing family's tiny (the shipped one by default): after a
change to this recipe, or to replay the shipped file (its json holds that command).

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
(what sd-webui-controlnet loads), fp16, with ``control_tiny_canny.json`` beside it. As
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
from pathlib import Path

import numpy as np
import torch

from sdbatch import preprocessors
from sdbatch.tiny_train import scenes
from sdbatch.tiny_train.train import (
    Clock,
    Diffusion,
    Settings,
    descend,
    is_hires_step,
    load_shipped,
    lr_factor,
    seed_of,
    to_tensor,
    token_ids,
    train_loop,
    versions,
)

NAME = "control_tiny_canny"
POSITION_CLAUSES = {"on the left", "on the right", "in the centre", "in the center",
                    "in the middle"}


PROCESSOR_RES = (64, 128, 512)  # every processor_res a user picks is one the net has seen
HINT_CHANNELS = (16, 32, 64, 128)  # the hint encoder's widths
READS = ("controlnet_pool", "controlnet_hires_pool", "controlnet_batch", "controlnet_lr",
         "controlnet_empty", "canny_low", "canny_high", "hires_every", "hires_size",
         "min_snr", "warmup", "size")  # the Settings this part depends on, besides the seed


def caption(scene: scenes.Scene, rng: random.Random) -> str:
    """The scene's caption without its position clause."""
    parts = scenes.caption(scene, rng).split(", ")
    return ", ".join(p for p in parts if p not in POSITION_CLAUSES)


def control_map(image: np.ndarray, res: int, low: int, high: int) -> np.ndarray:
    """The canny map sdbatch hands a 64 px stage for ``image`` at processor_res ``res``."""
    h, w = image.shape[:2]
    edges = preprocessors.canny(image, res, low, high)
    return preprocessors.fit(edges, "crop_and_resize", w, h)


def make_pool(pipe, settings: Settings, n_scenes: int, size: int):
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
        maps.append(np.stack([control_map(im, int(rng.choice(PROCESSOR_RES)),
                                          settings.canny_low, settings.canny_high)
                              for im in images]))
        drawn += sc
    hints = torch.from_numpy(np.concatenate(maps)).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat(latents), hints, drawn


def train_controlnet(settings: Settings, clock: Clock, report: dict, family: Path,
                     out: Path) -> Path:
    """Train the ControlNet for ``family``'s tiny/ as tiny_train's part "controlnet" (its
    share of the clock, or ``settings.steps["controlnet"]``); write it and its record."""
    from diffusers import ControlNetModel

    from sdbatch.models import ldm_export

    started = clock.start_part("controlnet")
    pipe = load_shipped(family / "tiny")
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    t0 = time.monotonic()
    pools = {False: make_pool(pipe, settings, settings.controlnet_pool, settings.size)}
    hires = settings.hires_every > 0 and settings.controlnet_hires_pool > 0
    if hires:
        pools[True] = make_pool(pipe, settings, settings.controlnet_hires_pool,
                                settings.hires_size)
    pool_s = round(time.monotonic() - t0, 1)
    print(f"[controlnet] {sum(len(p[2]) for p in pools.values())} scenes and edge maps "
          f"in {pool_s} s", flush=True)
    torch.manual_seed(seed_of(settings.seed, "controlnet-init"))
    cn = ControlNetModel.from_unet(
        pipe.unet, conditioning_embedding_out_channels=HINT_CHANNELS).train()
    lr = settings.controlnet_lr
    opt = torch.optim.AdamW(cn.parameters(), lr=lr, weight_decay=0.01)
    diffusion = Diffusion(settings.min_snr)
    gen = torch.Generator().manual_seed(seed_of(settings.seed, "controlnet-noise"))
    order = np.random.default_rng(seed_of(settings.seed, "controlnet-order"))
    queues: dict[bool, list[int]] = {False: [], True: []}

    def step(i: int, total: int) -> float:
        big = hires and is_hires_step(i, settings)
        latents, hints, drawn = pools[big]
        n = max(1, settings.controlnet_batch // 4) if big else settings.controlnet_batch
        while len(queues[big]) < n:
            queues[big] += order.permutation(len(drawn)).tolist()
        idx, queues[big] = queues[big][:n], queues[big][n:]
        rng = random.Random(seed_of(settings.seed, "controlnet-captions", i))
        texts = ["" if rng.random() < settings.controlnet_empty else caption(drawn[j], rng)
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
            g["lr"] = lr * lr_factor(i, total, min(settings.warmup, 50))
        descend(opt, loss, cn.parameters())
        return float(loss.detach())

    train_loop("controlnet", step, settings, clock, report, started)
    cn.eval()
    path = ldm_export.save_controlnet(cn, out / "ControlNet" / f"{NAME}.safetensors",
                                      torch.float16)
    part = report["controlnet"]
    part.update(file=str(path.relative_to(out)), bytes=path.stat().st_size,
                parameters=sum(p.numel() for p in cn.parameters()), pool_s=pool_s,
                tiny_unet_sha256=_unet_hash(family))
    record = {
        "command": replay_command(family, out, settings, part),
        "settings": {"seed": settings.seed, "threads": settings.threads,
                     **{k: getattr(settings, k) for k in READS},
                     "processor_res": PROCESSOR_RES, "hint_channels": HINT_CHANNELS},
        **part, "versions": versions(),
    }
    (out / "ControlNet" / f"{NAME}.json").write_text(json.dumps(record, indent=2))
    return path


def replay_command(family: Path, out: Path, settings: Settings, part: dict) -> str:
    """The standalone command that redoes this ControlNet against the same tiny, no clock."""
    default = Settings()
    steps = f"{part['steps']}" + (f":{part['steps_done']}"
                                  if part["steps_done"] < part["steps"] else "")
    changed = [f"{k}={getattr(settings, k)}" for k in READS
               if k not in ("controlnet_pool", "controlnet_hires_pool")
               and getattr(settings, k) != getattr(default, k)]
    return " ".join([f"python -m sdbatch.tiny_train.controlnet --family {family} --out {out}",
                     f"--seed {settings.seed} --threads {settings.threads}",
                     f"--pool {settings.controlnet_pool}",
                     f"--hires-pool {settings.controlnet_hires_pool} --steps {steps}",
                     *(["--set", *changed] if changed else [])])


def _unet_hash(family: Path) -> str:
    """Which tiny UNet the ControlNet was trained against (a retrained tiny needs a retrain)."""
    from sdbatch.models.hashing import sha256

    return sha256(family / "tiny" / "unet" / "diffusion_pytorch_model.safetensors")[:12]


def parse_steps(text: str) -> tuple[int, int | None]:
    """``2062``, or ``2062:1500`` for a run cut short at step 1500."""
    total, _, stop = text.partition(":")
    try:
        return int(total), int(stop) if stop else None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: want STEPS[:STOPPED_AT]") from e


def main(argv: list[str] | None = None) -> int:
    from sdbatch.models import tiny
    from sdbatch.tiny_train.__main__ import parse_set

    p = argparse.ArgumentParser(prog="python -m sdbatch.tiny_train.controlnet",
                                description=__doc__.splitlines()[0])
    p.add_argument("--family", type=Path, default=tiny.family_models(),
                   help="the tiny family folder whose tiny/ it steers (default: the shipped)")
    p.add_argument("--out", type=Path, required=True, help="writes ControlNet/ here")
    p.add_argument("--minutes", type=float, default=18.0)
    p.add_argument("--steps", type=parse_steps, default=(0, None),
                   help="fixed step count: replays a run")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--threads", type=int, default=Settings.threads)
    p.add_argument("--pool", type=int, default=Settings.controlnet_pool)
    p.add_argument("--hires-pool", type=int, default=Settings.controlnet_hires_pool,
                   help="128 px scenes (0: train at 64 px only)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"any other setting it reads: {', '.join(READS)}")
    args = p.parse_args(argv)
    chosen = parse_set(args.set)
    if unread := sorted(set(chosen) - set(READS)):
        p.error(f"--set {', '.join(unread)}: not a setting of the ControlNet; it reads "
                f"{', '.join(READS)}")
    steps, stop = args.steps
    settings = Settings(minutes=args.minutes, seed=args.seed, threads=args.threads,
                        steps={"controlnet": steps} if steps else {},
                        stop={"controlnet": stop} if stop else {},
                        controlnet_pool=args.pool, controlnet_hires_pool=args.hires_pool,
                        **chosen)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        report: dict = {}
        train_controlnet(settings, Clock(settings), report, args.family, args.out)
    finally:
        torch.set_num_threads(threads)
    part = report["controlnet"]
    print(f"{part['file']}: {part['steps_done']} steps in {part['seconds']} s, "
          f"{part['bytes']} bytes; replay: "
          f"{replay_command(args.family, args.out, settings, part)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
