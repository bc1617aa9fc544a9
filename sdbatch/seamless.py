"""Model-wide settings a batch switches on and off on the shared stack: seamless tiling
(the WebUI's "Tiling") and the VAE working in tiles on big pictures.

Tiling makes every padded Conv2d of the UNet and the VAE wrap around the picture's edges
(circular padding) in x, y or both, so the picture continues across its own borders; it is
undone when the batch ends, leaving the stack as loaded for the next batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _wrapped_forward(conv: nn.Conv2d, wrap_x: bool, wrap_y: bool, x: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    ph, pw = conv.padding
    x = F.pad(x, (pw, pw, 0, 0), mode="circular" if wrap_x else "constant")
    x = F.pad(x, (0, 0, ph, ph), mode="circular" if wrap_y else "constant")
    return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)


@contextmanager
def tiling(models: Iterable[nn.Module], mode: str) -> Iterator[None]:
    """Within the block the models' padded convolutions wrap in x (``x``), y (``y``) or
    both (``true``); ``false`` changes nothing."""
    if mode == "false":
        yield
        return
    wrap_x, wrap_y = mode in ("true", "x"), mode in ("true", "y")
    convs = [m for model in models for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
             and not isinstance(m.padding, str) and any(m.padding)]
    for conv in convs:  # an instance attribute shadows the class's method until deleted
        conv._conv_forward = partial(_wrapped_forward, conv, wrap_x, wrap_y)
    try:
        yield
    finally:
        for conv in convs:
            del conv._conv_forward


def vae_tiles(vae: nn.Module, px: int) -> None:
    """The VAE encodes and decodes in overlapping tiles of px x px (diffusers' tiling)
    whenever a picture has a side over px pixels; smaller pictures go whole."""
    if not hasattr(vae, "enable_tiling"):
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling()
    vae.tile_sample_min_size = px
    vae.tile_latent_min_size = px // factor
