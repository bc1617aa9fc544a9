"""What a stage hands to the next: the picture, and the latents it was decoded from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class Picture:
    """A stage's result. ``latents`` is None where the picture was made in pixel space (an
    init image, an inpaint composite): a later latent-space step encodes it."""

    image: Image.Image
    latents: torch.Tensor | None = None  # (C, h, w) on the CPU, float32
