"""What the image-to-image stages share: the picture a stage hands to the next, VAE
encoding, and sampling the tail of a noise schedule from an init latent (the WebUI's
img2img), per image seeded as the first pass is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdbatch import control as controlnet
from sdbatch import noise, samplers, sampling
from sdbatch.denoise_steps import Tail
from sdbatch.matrix import Render
from sdbatch.models.stack import Stack
from sdbatch.stages.picture import Picture
from sdbatch.stages.txt2img import (
    Timeline,
    _guidance_embedding,
    _same_length_groups,
    _time_ids,
    batch_conditioning,
)
from sdbatch.stages.vae import encode, full_mask_conditioning, pixels  # noqa: F401 - the stages' API

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Item:
    """One call of a batch: its image's render (the step's prompt, sampler, seed and size
    written in), the step's parameters, and the picture it starts from."""

    render: Render
    params: dict[str, Any]
    source: Picture


def stage_render(render: Render, params: dict[str, Any], steps: int,
                 size: tuple[int, int]) -> Render:
    """The image's render as this step samples it: its prompt, sampler, seed, CFG and size."""
    return dataclasses.replace(
        render, prompt=params["prompt"], negative_prompt=params["negative_prompt"],
        sampler=params["sampler"], schedule_type=params["schedule_type"],
        cfg_scale=params["cfg_scale"], seed=params["seed"], steps=steps,
        width=size[0], height=size[1])


def image_noise(render: Render, shape: tuple[int, int, int]) -> torch.Tensor:
    """The step's noise at its latent shape: the image's seed (and variation seed) drawn
    again at the new size, as the WebUI's second passes do."""
    return noise.initial_noise(shape, render.seed, render.subseed, render.subseed_strength,
                               (render.seed_resize_from_w, render.seed_resize_from_h))


def sample_tail(stack: Stack, renders: list[Render], init: torch.Tensor, tail: Tail,
                on_step: StepCallback | None = None, *, mask: torch.Tensor | None = None,
                image_conditioning: torch.Tensor | None = None,
                control: list[controlnet.Unit] | None = None,
                control_rows: list[list[np.ndarray]] | None = None,
                hires: bool = False, first_passes: list[int | None] | None = None,
                conditioned_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Run the last ``tail.run`` steps of a ``tail.schedule``-step schedule from ``init``
    (B, C, h, w) for images of one forward pass; returns the sampled latents.

    Prompt schedules ([a:b:when], [a|b], AND) count from the first step run, over the
    step's own steps, as the WebUI's second passes count them. ``control`` are the pass's
    ControlNet units; ``control_rows[u]`` unit u's maps, one per image (default: the map
    at the step's size for every image); ``hires`` marks a hires fix pass, whose images'
    prompt schedules go on from their ``first_passes`` (model calls) as the WebUI's do.
    ``conditioned_size``: the size SDXL is told (default: the step's); a hires fix that
    crops its cover tells the cover's, as the WebUI does.
    """
    units = control or []
    if control_rows is None:
        control_rows = [[controlnet.at_size(u, renders[0].width, renders[0].height)]
                        * len(renders) for u in units]
    pipe = stack.pipe
    first = renders[0]
    init = init.to(stack.device, stack.dtype)
    if image_conditioning is None:  # an inpainting model outside inpaint: all to paint
        image_conditioning = full_mask_conditioning(pipe, len(renders), init.shape[2:],
                                                    stack.device)
    per_step = sampling.calls_per_step(
        samplers.make_scheduler(stack.scheduler_config, first.sampler, first.schedule_type))
    first_call = tail.start * per_step  # as sampling.sample slices the schedule
    timelines = [Timeline(pipe, r, per_step, stack.device, stack.dtype,
                          first_passes[i] if first_passes else None)
                 for i, r in enumerate(renders)]
    shape = tuple(init.shape[1:])
    out = torch.empty_like(init)
    time_ids = _time_ids(pipe, *(conditioned_size or (first.width, first.height)),
                         stack.dtype, stack.device)
    for group in _same_length_groups(timelines):
        members = [renders[i] for i in group]
        mine = [timelines[i] for i in group]
        scheduler = samplers.make_scheduler(stack.scheduler_config, first.sampler,
                                            first.schedule_type)
        seeds, cfg_scales = [r.seed for r in members], [r.cfg_scale for r in members]
        if hasattr(scheduler, "noise_sampler_seed"):
            scheduler.noise_sampler_seed = seeds
        start_noise = torch.stack([image_noise(r, shape) for r in members]).to(
            stack.device, stack.dtype)
        generators = [noise.sampler_generator(r.seed, r.ensd, shape) for r in members]

        def report(done: int, _steps: int) -> None:
            if on_step:
                on_step(done - tail.start, tail.run)

        rows = [[maps[i] for i in group] for maps in control_rows]
        with controlnet.stage(units, rows, stack.device, stack.dtype, hires) as ctrl:
            out[group] = sampling.sample(
                pipe.unet, scheduler, start_noise, tail.schedule,
                lambda call, mine=mine, t=time_ids: batch_conditioning(mine, call - first_call,
                                                                       t),
                cfg_scales,
                step_kwargs={"generator": generators,
                             "eta": first.eta if first.eta is not None else 0.0},
                seeds=seeds, start_step=tail.start, init_latents=init[group], on_step=report,
                timestep_cond=_guidance_embedding(pipe, cfg_scales, stack.dtype,
                                                  stack.device),
                mask=None if mask is None else mask[group].to(stack.device, stack.dtype),
                image_conditioning=(None if image_conditioning is None
                                    else image_conditioning[group].to(stack.device,
                                                                      stack.dtype)),
                control=ctrl)
    return out
