"""What a stage hands to the next: the picture, the latents it was decoded from, and what
the stages of its chain found about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class Picture:
    """A stage's result. ``latents`` is None where the picture was made in pixel space (an
    init image, an inpaint composite): a later latent-space step encodes it. ``found`` is
    what the stage that made it found (a face restoration: how many faces); the executor
    files it, with the chain's earlier findings, in ``chain_found`` by call key, which the
    manifest writes into each stage's record."""

    image: Image.Image
    latents: torch.Tensor | None = None  # (C, h, w) on the CPU, float32
    found: dict[str, Any] = field(default_factory=dict)
    chain_found: dict[str, dict[str, Any]] = field(default_factory=dict)
