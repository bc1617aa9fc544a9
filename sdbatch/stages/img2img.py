"""img2img: the previous picture (or the init image) brought to width x height by the
WebUI's resize mode, encoded, noised part way by ``denoise`` and sampled from there.

About denoise x steps run, as the WebUI's img2img counts them (sdbatch.denoise_steps).
Denoise 0 samples nothing: the picture passes through, resized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdbatch import denoise_steps, images
from sdbatch.models.stack import Stack
from sdbatch.stages.common import (
    Item,
    StepCallback,
    encode,
    sample_tail,
    stage_render,
)
from sdbatch.stages.picture import Picture
from sdbatch.stages.txt2img import pictures


def run(stack: Stack, items: list[Item], on_step: StepCallback | None = None,
        control: list | None = None) -> list[Picture]:
    first = items[0].params
    width, height = first["output_size"]
    mode = first["resize_mode"]
    tail = denoise_steps.img2img(first["steps"], first["denoise"])
    if tail.run == 0:
        return [Picture(images.resize(item.source.image, "just_resize" if mode ==
                                      "latent_upscale" else mode, width, height))
                for item in items]
    pipe = stack.pipe
    if mode == "latent_upscale":  # encode as it is, then stretch the latent (bilinear)
        latents = torch.cat([encode(pipe, [item.source.image], stack.device) for item in items])
        latents = F.interpolate(latents.float(), size=(height // 8, width // 8),
                                mode="bilinear").to(latents.dtype)
    else:
        latents = encode(pipe, [images.resize(item.source.image, mode, width, height)
                                for item in items], stack.device)
    renders = [stage_render(item.render, item.params, item.params["steps"], (width, height))
               for item in items]
    return pictures(pipe, sample_tail(stack, renders, latents, tail, on_step, control=control))
