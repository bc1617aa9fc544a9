"""Each image's starting noise, as the WebUI makes it: from the image's own seed on the CPU,
optionally blended toward a variation seed (slerp) and drawn as if at another size.

The SDE samplers' Brownian trees (torchsde) are drawn on the CPU too: importing this module
replaces torchsde's draw, as the WebUI does for its default RNG source, so those samplers'
noise does not depend on the device either.
"""

from __future__ import annotations

import torch
import torchsde._brownian.brownian_interval as brownian_interval


def randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def _brownian_randn(size, dtype, device, seed) -> torch.Tensor:
    """A Brownian tree node's draw: in fp32 on the CPU, then moved, where torchsde draws
    with the latents' device's generator in their dtype (the WebUI's torchsde_randn)."""
    return randn(int(seed), tuple(size)).to(device=device, dtype=dtype)


brownian_interval._randn = _brownian_randn


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The WebUI's spherical blend of two noises (t = variation strength), norms over dim 1."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(t * omega) / so).unsqueeze(1) * high


def paste_centered(noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Put ``noise`` (C, h, w) in the middle of ``target`` (C, H, W), cropping what overhangs:
    the composition of the 'seed resize from' size survives at the new size.

    As the WebUI's create_random_tensors: the offset is floor((H - h) / 2), and a side that
    shrinks is cropped by that offset at both ends, so shrinking by an odd amount pastes
    one row or column less and the target's own noise shows in the last one.
    """
    out = target.clone()
    _, h, w = noise.shape
    _, height, width = target.shape
    dy, dx = (height - h) // 2, (width - w) // 2
    ch, cw = (h if dy >= 0 else h + 2 * dy), (w if dx >= 0 else w + 2 * dx)
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out[:, ty:ty + ch, tx:tx + cw] = noise[:, sy:sy + ch, sx:sx + cw]
    return out


def initial_noise(shape: tuple[int, int, int], seed: int, subseed: int = 0,
                  subseed_strength: float = 0.0, resize_from: tuple[int, int] = (0, 0)
                  ) -> torch.Tensor:
    """Latent noise (C, H, W) for one image. ``resize_from`` is (width, height) in pixels."""
    rw, rh = resize_from
    drawn = shape if rw <= 0 or rh <= 0 else (shape[0], rh // 8, rw // 8)
    noise = randn(seed, drawn)
    if subseed_strength > 0:
        noise = slerp(subseed_strength, noise, randn(subseed, drawn))
    if drawn != shape:
        noise = paste_centered(noise, randn(seed, shape))
    return noise


def sampler_generator(seed: int, ensd: int, shape: tuple[int, int, int]) -> torch.Generator:
    """The generator for a sampler's later noise (ancestral steps): the image's seed past its
    initial draw, or seed + ENSD afresh when an eta noise seed delta is set (the WebUI's)."""
    if ensd:
        return torch.Generator("cpu").manual_seed(seed + ensd)
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.randn(shape, generator=generator)
    return generator
