"""ControlNet units at sampling time, with sd-webui-controlnet's semantics (scripts/hook.py).

At every model call each unit whose guidance window holds the sampling step runs its
ControlNet on the UNet's input and hands the UNet one residual per down block and one for
the mid block, scaled:

- ``balanced``: every residual times the unit's weight, on every row of the batch;
- ``my_prompt`` ("My prompt is more important"): soft injection, residual i of 13 times
  weight x 0.825^(12 - i) (the deepest count most), on every row;
- ``controlnet`` ("ControlNet is more important"): the soft factors too, and the
  residuals only on the prompt rows, none on the negative prompt's, so that CFG pushes
  towards the control.

In a hires fix pass a canny unit is soft-injected whatever its mode, as the extension does
(it reduces artifacts). Several units add their residuals. The window is the extension's:
start <= step / steps <= end over the steps a stage samples, where step is the one the
WebUI reports at the model call, the last finished one (window_fraction), so a unit acts
one step later than its fraction says and ``guidance_end: 0`` still acts on the first two
steps. Weight 0 leaves a unit out of sampling entirely (a recolor unit's post-processing
still applies, as in the extension).

The control image goes through the ControlNet's hint encoder once per batch, not once per
model call: its output is kept and handed to the model at each call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from sdbatch import preprocessors, tiles
from sdbatch.preprocessor_names import RECOLOR


@dataclass(frozen=True)
class Unit:
    """One unit as the executor hands it to a stage: its parameters (plan.control_units),
    the loaded ControlNet and the preprocessed control map (H x W x 3 uint8)."""

    params: dict[str, Any]
    model: Any
    detected: np.ndarray


@dataclass
class Active:
    """One unit during a batch: its hint rows (one per image of the forward pass)."""

    model: Any
    hint: torch.Tensor  # (B, 3, H, W) in 0..1
    weight: float
    start: float
    end: float
    soft: bool
    cond_only: bool
    embedded: torch.Tensor | None = field(default=None, repr=False)

    def on(self, step: int, steps: int) -> bool:
        return self.weight != 0 and self.start <= window_fraction(step, steps) <= self.end


def window_fraction(step: int, steps: int) -> float:
    """The fraction the extension tests at a model call of ``step`` (0-based) of ``steps``:
    the WebUI's state.sampling_step, which the sampler's callback sets to a step once it
    has finished, so the first two steps both read 0 and step i reads (i - 1) / steps."""
    return max(step - 1, 0) / max(steps, 1)


def recolored(image: Image.Image, control_map: np.ndarray, preprocessor: str) -> Image.Image:
    """The extension's recolor post-processing of a finished picture: its lightness (Lab L,
    recolor_luminance) or value (HSV V, recolor_intensity) replaced by the control map's
    (at the picture's size), which sampling was only steered towards."""
    to, back, channel = ((cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB, 0)
                         if RECOLOR[preprocessor] == "lab"
                         else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2))
    converted = cv2.cvtColor(np.asarray(image.convert("RGB")), to)
    converted[:, :, channel] = control_map[:, :, 0]
    return Image.fromarray(cv2.cvtColor(converted, back))


def hint(maps: list[np.ndarray]) -> torch.Tensor:
    """Control maps -> (B, 3, H, W) floats in 0..1, as the extension hands them over."""
    return torch.stack([torch.from_numpy(np.array(m)).permute(2, 0, 1)
                        for m in maps]).float() / 255.0


def at_size(unit: Unit, w: int, h: int) -> np.ndarray:
    """The unit's control map at a stage's size, by its resize mode."""
    return preprocessors.fit(unit.detected, unit.params["resize_mode"], w, h)


def cropped(unit: Unit, picture: tuple[int, int], box: tuple[int, int, int, int],
            w: int, h: int) -> np.ndarray:
    """The map fitted to the whole picture, cut to ``box`` and fitted to w x h as inpaint
    fits the picture's crop there (resize and fill: a box clipped at the picture's edge has
    another aspect than the processing size)."""
    x1, y1, x2, y2 = box
    whole = at_size(unit, *picture)
    return preprocessors.fit(whole[y1:y2, x1:x2], "resize_and_fill", w, h)


def tile_maps(unit: Unit, size: tuple[int, int], grid: tiles.Grid) -> list[np.ndarray]:
    """SD upscale: the map fitted to the upscaled picture and cut with its tiles."""
    whole = Image.fromarray(at_size(unit, *size))
    return [np.asarray(t) for t in tiles.split(whole, grid)]


class Control:
    """The units of one forward pass. ``rows[u]`` are unit u's maps, one per image."""

    def __init__(self, units: list[Unit], rows: list[list[np.ndarray]], device, dtype,
                 hires: bool = False):
        self.active = []
        for unit, maps in zip(units, rows, strict=True):
            p = unit.params
            soft = p["control_mode"] != "balanced" or (hires and p["preprocessor"] == "canny")
            self.active.append(Active(unit.model, hint(maps).to(device, dtype), p["weight"],
                                      p["guidance_start"], p["guidance_end"], soft,
                                      p["control_mode"] == "controlnet"))

    @contextmanager
    def encoded(self):
        """Run each hint encoder once for the batch; while inside, every ControlNet takes
        the encoded hint as it is."""
        swapped = []
        try:
            with torch.no_grad():
                for a in self.active:
                    cn = a.model
                    x = a.hint.to(cn.dtype)
                    if cn.config.controlnet_conditioning_channel_order == "bgr":
                        x = torch.flip(x, dims=[1])
                    a.embedded = cn.controlnet_cond_embedding(x)
            for a in self.active:
                if not any(a.model is m for m, _ in swapped):
                    swapped.append((a.model, a.model.controlnet_cond_embedding))
                    a.model.controlnet_cond_embedding = _Encoded(
                        a.model.config.controlnet_conditioning_channel_order == "bgr")
            yield self
        finally:
            for model, encoder in swapped:
                model.controlnet_cond_embedding = encoder

    def residuals(self, x: torch.Tensor, t, context: torch.Tensor, images: list[int],
                  uncond_rows: int, step: int, steps: int, added: dict | None
                  ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """The summed residuals for one model call of ``step`` of the ``steps`` a stage
        samples (rows ``images`` of the pass, the first ``uncond_rows`` of them negative
        prompts), or (None, None) when no unit is on."""
        down_sum, mid_sum = None, None
        for a in self.active:
            if not a.on(step, steps):
                continue
            down, mid = a.model(x, t, encoder_hidden_states=context,
                                controlnet_cond=a.embedded[images], conditioning_scale=1.0,
                                added_cond_kwargs=added, return_dict=False)
            scales = preprocessors.control_scales(a.weight, len(down) + 1, a.soft)
            down = [d * s for d, s in zip(down, scales, strict=False)]
            mid = mid * scales[len(down)]
            if a.cond_only and uncond_rows:
                keep = torch.ones(len(images), 1, 1, 1, device=x.device, dtype=mid.dtype)
                keep[:uncond_rows] = 0
                down, mid = [d * keep for d in down], mid * keep
            if down_sum is None:
                down_sum, mid_sum = down, mid
            else:
                down_sum = [s + d for s, d in zip(down_sum, down, strict=True)]
                mid_sum = mid_sum + mid
        return down_sum, mid_sum


class _Encoded(torch.nn.Module):
    """Stands in for a ControlNet's hint encoder while the encoded hint is handed in."""

    def __init__(self, flipped: bool):
        super().__init__()
        self.flipped = flipped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[1]) if self.flipped else x  # undo the model's own flip


@contextmanager
def stage(units: list[Unit], rows: list[list[np.ndarray]], device, dtype,
          hires: bool = False):
    """The Control of one forward pass, its hints encoded, or None without units."""
    if not units:
        yield None
        return
    with Control(units, rows, device, dtype, hires).encoded() as control:
        yield control
