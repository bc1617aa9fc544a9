"""The VAE: pictures into latents and back, in the precision each family needs, and what a
9-channel inpainting model takes beside its latents where its step has no mask."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@contextmanager
def upcast(pipe) -> Iterator[None]:
    """SDXL's fp16 VAE in fp32 for the while, where its config asks (force_upcast, as in
    diffusers): it overflows in fp16."""
    vae = pipe.vae
    up = is_sdxl(pipe) and vae.dtype == torch.float16 and vae.config.force_upcast
    try:
        if up:  # in the try: a cast cut short (out of memory) leaves the VAE half-cast
            vae.to(torch.float32)
        yield
    finally:
        if up:
            vae.to(torch.float16)


def half_safe(vae, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """run() with the VAE as it is; where a half-precision VAE overflows (NaN or inf: some
    SD1 VAEs at large sizes), run() again with the VAE in float32, as the WebUI's automatic
    VAE precision does. run() casts its input to vae.dtype itself."""
    out = run()
    if vae.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(out).all()):
        dtype = vae.dtype
        try:
            vae.to(torch.float32)
            out = run()
        finally:
            vae.to(dtype)
    return out


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """Pictures -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32))
                        .permute(2, 0, 1) / 127.5 - 1.0 for im in images])


def encode(pipe, images: list[Image.Image] | torch.Tensor, device: torch.device
           ) -> torch.Tensor:
    """Pictures (or their pixels(), -1..1) -> scaled latents (B, C, h, w), the posterior's
    mode: an encode depends on the picture alone, not on a seed, so equal inputs give
    equal keys' results."""
    return _encode(pipe, images if isinstance(images, torch.Tensor) else pixels(images), device)


@torch.no_grad()
def _encode(pipe, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    vae = pipe.vae
    with upcast(pipe):
        latents = half_safe(vae, lambda: vae.encode(x.to(device, vae.dtype)).latent_dist.mode())
    mean, std = (getattr(vae.config, "latents_mean", None),
                 getattr(vae.config, "latents_std", None))
    if mean is not None and std is not None:
        view = (1, len(mean), 1, 1)
        m, s = torch.tensor(mean).view(view).to(latents), torch.tensor(std).view(view).to(latents)
        return (latents - m) * vae.config.scaling_factor / s
    return latents * vae.config.scaling_factor


def full_mask_conditioning(pipe, n: int, latent_size: tuple[int, int],
                           device: torch.device) -> torch.Tensor | None:
    """What a 9-channel inpainting model takes where its step has no mask, as the WebUI
    gives it (txt2img, img2img without a mask): the mask all 1 and the masked picture all
    mid-grey (0 in -1..1), so everything is to be painted; (n, 5, h, w) on the CPU. None
    for other models."""
    if pipe.unet.config.in_channels != 9:
        return None
    h, w = latent_size
    scale = pipe.vae_scale_factor
    grey = encode(pipe, torch.zeros(1, 3, h * scale, w * scale), device).float().cpu()
    return torch.cat([torch.ones(1, 1, h, w), grey], dim=1).expand(n, -1, -1, -1)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images as the diffusers pipelines decode them (latents_mean/std where
    the VAE has them), in the VAE's safe precision."""
    vae = pipe.vae
    latents = latents.float()
    mean, std = (getattr(vae.config, "latents_mean", None),
                 getattr(vae.config, "latents_std", None))
    if mean is not None and std is not None:
        view = (1, len(mean), 1, 1)
        latents = (latents * torch.tensor(std).view(view).to(latents)
                   / vae.config.scaling_factor + torch.tensor(mean).view(view).to(latents))
    else:
        latents = latents / vae.config.scaling_factor
    with upcast(pipe):
        image = half_safe(vae, lambda: vae.decode(latents.to(vae.dtype), return_dict=False)[0])
    return to_pil(image)


def to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """The VAE's output (B, 3, H, W in -1..1) as 8-bit pictures the WebUI's way: clamped
    (x + 1) / 2, times 255, truncated (diffusers rounds, one level up on about half the
    values)."""
    x = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
    arrays = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
