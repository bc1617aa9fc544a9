"""Train a tiny Real-ESRGAN Compact x2 upscaler on the toy scenes, to ship beside tiny.

    python -m sdbatch.tiny_train.upscaler --out DIR --minutes 5

SD upscale and hires fix need an upscaler that knows the pictures it enlarges: a
random-weight network would make them worse and prove nothing. The pairs are toy scenes
drawn at 128 or 256 px (high resolution) and the same scenes shrunk by 2 with a random
blur (what a diffusion output at the smaller size looks like: soft edges); the network
learns to give the edges back. The architecture is Real-ESRGAN's SRVGGNetCompact (the
WebUI's "R-ESRGAN General 4xV3" family: convolutions at the small size, a pixel shuffle,
the nearest-upscaled input added back), which spandrel (and so the WebUI, ComfyUI and
sdbatch) recognises from the state dict alone, and which trains in CPU minutes where an
RRDB ESRGAN needs hours; the file is ``ESRGAN/2x-tiny-Compact.safetensors``.

As in train.py: a few steps measure the speed, then the step count is fixed and recorded;
``--steps N`` replays it without a clock, identically on the same machine and threads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from sdbatch.tiny_train import scenes
from sdbatch.tiny_train.train import clocked_loop, lr_factor, seed_of, to_tensor, versions

NAME = "2x-tiny-Compact"


@dataclass
class UpscalerSettings:
    minutes: float = 5.0
    steps: int = 0  # fixed count: no clock
    seed: int = 0
    threads: int = 2
    scale: int = 2
    num_feat: int = 32
    num_conv: int = 8
    patch: int = 32  # low-resolution crop side; the target is patch * scale
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 20
    sizes: tuple[int, ...] = (128, 256)  # high-resolution scene sizes
    max_blur: float = 1.0  # sigma of the blur before shrinking, drawn from [0, max_blur]
    lego: float = 0.3  # share of LoRA-look scenes


def build(settings: UpscalerSettings) -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=settings.num_feat,
                   num_conv=settings.num_conv, upscale=settings.scale)


def shrink(image: np.ndarray, scale: int, sigma: float) -> np.ndarray:
    """The low-resolution twin: blurred by ``sigma`` (0: not at all), area-averaged."""
    if sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    h, w = image.shape[:2]
    return cv2.resize(image, (w // scale, h // scale), interpolation=cv2.INTER_AREA)


def pairs(settings: UpscalerSettings, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of (low, high) crops, all from the step's seed."""
    rng = np.random.default_rng(seed_of(settings.seed, "upscaler", step))
    size = int(rng.choice(settings.sizes))
    style = "legoalrev" if rng.random() < settings.lego else "plain"
    images, _, _ = scenes.batch(seed_of(settings.seed, "upscaler-scenes", step),
                                settings.batch, size, style=style)
    high_side = settings.patch * settings.scale
    lows, highs = [], []
    for image in images:
        y, x = (int(rng.integers(0, (size - high_side) // settings.scale + 1)) * settings.scale
                for _ in range(2))
        high = image[y:y + high_side, x:x + high_side]
        lows.append(shrink(high, settings.scale, float(rng.uniform(0, settings.max_blur))))
        highs.append(high)
    return to_tensor(np.stack(lows)), to_tensor(np.stack(highs))


def psnr_against_lanczos(model: torch.nn.Module, settings: UpscalerSettings) -> dict:
    """Held-out scenes at 256 px, shrunk and enlarged again: the model against Lanczos."""
    from PIL import Image

    images, _, _ = scenes.batch(seed_of(settings.seed, "upscaler-check"), 16, 256)
    low = np.stack([shrink(im, settings.scale, 0.5) for im in images])
    with torch.no_grad():
        out = model(to_tensor(low).add(1).div(2)).clamp(0, 1)
    ours = (out.permute(0, 2, 3, 1).numpy() * 255).round()
    lanczos = np.stack([np.asarray(Image.fromarray(im).resize((256, 256), Image.LANCZOS))
                        for im in low]).astype(np.float64)

    def psnr(a: np.ndarray) -> float:
        return round(10 * math.log10(255**2 / float(((a - images) ** 2).mean())), 2)

    return {"psnr_model": psnr(ours), "psnr_lanczos": psnr(lanczos)}


def train(out: Path, settings: UpscalerSettings) -> dict:
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        torch.manual_seed(seed_of(settings.seed, "upscaler-init"))
        model = build(settings)
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr)

        def step(i: int, total: int) -> float:
            low, high = pairs(settings, i)
            for g in opt.param_groups:
                g["lr"] = settings.lr * lr_factor(i, total, settings.warmup)
            pred = model(low.add(1).div(2))  # spandrel's models take and give 0..1
            loss = (pred - high.add(1).div(2)).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        run = clocked_loop("upscaler", step, settings.steps or None, settings.minutes * 60,
                           time.monotonic(), label="L1")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    path = out / "ESRGAN" / f"{NAME}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    record = {
        "command": f"python -m sdbatch.tiny_train.upscaler --out {out} --seed {settings.seed} "
                   f"--threads {settings.threads} --steps {run.total}",
        "settings": {**asdict(settings), "steps": run.total},
        "file": str(path.relative_to(out)),
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": run.seconds,
        "loss_curve": run.curve, "check": psnr_against_lanczos(model, settings),
        "versions": versions(),
    }
    (out / "upscaler_settings.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdbatch.tiny_train.upscaler",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=UpscalerSettings.minutes)
    p.add_argument("--steps", type=int, default=0, help="fixed step count: replays a run")
    p.add_argument("--seed", type=int, default=UpscalerSettings.seed)
    p.add_argument("--threads", type=int, default=UpscalerSettings.threads)
    args = p.parse_args(argv)
    record = train(args.out, UpscalerSettings(minutes=args.minutes, steps=args.steps,
                                              seed=args.seed, threads=args.threads))
    print(f"{record['file']}: {record['settings']['steps']} steps in {record['seconds']} s, "
          f"{record['check']}; replay: {record['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
