"""Hires fix, as the WebUI's second pass: upscale the first pass, then sample exactly
``steps`` steps of img2img at the new size with its own denoise, sampler and prompt.

Latent upscalers stretch the first pass's latents (F.interpolate, with or without
antialiasing); image upscalers (Lanczos, Nearest, or a model: upscalers.resize) decode,
resize and encode again. With both resize_x and resize_y the picture covers the box and
the overhang is cut off in latent cells, centred.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdbatch import denoise_steps, samplers, sampling, upscalers
from sdbatch.images import hires_size
from sdbatch.matrix import Render
from sdbatch.models.stack import Stack
from sdbatch.models.upscaler_models import UpscalerModels
from sdbatch.stages.common import (
    Item,
    StepCallback,
    encode,
    sample_tail,
    stage_render,
)
from sdbatch.stages.picture import Picture
from sdbatch.stages.txt2img import pictures

LATENT_MODES = {  # the WebUI's latent upscale modes: (interpolate mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def upscaled_latents(stack: Stack, items: list[Item], upscaler: str, width: int,
                     height: int, models: UpscalerModels | None = None) -> torch.Tensor:
    """The batch's first passes at width x height, in latent space."""
    pipe = stack.pipe
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        sources = [item.source.latents if item.source.latents is not None else
                   encode(pipe, [item.source.image], stack.device)[0].float().cpu()
                   for item in items]
        return F.interpolate(torch.stack(sources).float(), size=(height // 8, width // 8),
                             mode=mode, antialias=antialias)
    model = models.pass_of(upscaler) if models else None
    return encode(pipe, [upscalers.resize(item.source.image, width, height, upscaler, model)
                         for item in items], stack.device).float()


def run(stack: Stack, items: list[Item], on_step: StepCallback | None = None,
        models: UpscalerModels | None = None, control: list | None = None) -> list[Picture]:
    """``models``: the run's upscaler models; ``control``: ControlNet units, their maps
    fitted to the hires size."""
    p = items[0].params
    size = hires_size(*p["input_size"], p["scale"], p["resize_x"], p["resize_y"])
    latents = upscaled_latents(stack, items, p["upscaler"], size.width, size.height,
                               models)
    tx, ty = size.truncate_x, size.truncate_y
    latents = latents[:, :, ty // 2:latents.shape[2] - (ty + 1) // 2,
                      tx // 2:latents.shape[3] - (tx + 1) // 2]
    tail = denoise_steps.exact(p["steps"], p["denoise"])
    if tail.run == 0:
        return pictures(stack.pipe, latents.to(stack.device, stack.dtype))
    renders = [stage_render(item.render, item.params, item.params["steps"], size.final)
               for item in items]
    return pictures(stack.pipe, sample_tail(stack, renders, latents, tail, on_step,
                                            control=control, hires=True,
                                            first_passes=[first_pass(stack, i.render)
                                                          for i in items],
                                            conditioned_size=(size.width, size.height)))


def first_pass(stack: Stack, render: Render) -> int | None:
    """The image's txt2img pass in model calls (steps x calls a step), which the WebUI's
    hires prompt schedules go on from; None for a chain from an init image (no first
    pass: the hires pass counts alone)."""
    if render.init_image is not None:
        return None
    scheduler = samplers.make_scheduler(stack.scheduler_config, render.sampler,
                                        render.schedule_type)
    return render.steps * sampling.calls_per_step(scheduler)
