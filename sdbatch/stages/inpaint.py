"""An inpaint pass with the WebUI's semantics: the mask (white repaints) is blurred in x
and y, the masked part is repainted, and the original is composited back through the
blurred mask, so every pixel outside it keeps its bytes.

- ``masked_content``: ``original`` starts from the picture; ``fill`` from the picture with
  the hole painted in its surrounding colours; ``latent_noise`` from the seed's noise in the
  hole; ``latent_nothing`` from an empty latent there (the last two are filled first too).
- ``inpaint_area``: ``whole_picture`` samples all of it at the processing size;
  ``only_masked`` crops the mask's box plus padding, grown to the processing aspect,
  samples that at the full processing size and pastes it back.
- Ordinary 4-channel models get the unmasked latent re-imposed after every step;
  9-channel inpainting models take mask and masked-picture latents as extra input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdbatch import control as controlnet
from sdbatch import denoise_steps, images, masks
from sdbatch.models.stack import Stack
from sdbatch.noise import randn
from sdbatch.stages.common import (
    Item,
    StepCallback,
    encode,
    sample_tail,
    stage_render,
)
from sdbatch.stages.picture import Picture
from sdbatch.stages.txt2img import decode


@dataclass
class Region:
    """One item made ready: what is sampled, where it goes back, through which mask."""

    picture: Image.Image  # the processing-size picture the latents start from
    mask: np.ndarray  # the blurred mask at processing size (latent mask, fill)
    base: Image.Image  # the picture composited over (the original at output size)
    overlay: np.ndarray  # the mask the repaint is composited through, at output size
    box: tuple[int, int, int, int] | None  # only masked: where the repaint is pasted


def region(item: Item) -> Region:
    p = item.params
    original = item.source.image
    width, height = p["output_size"]
    pw, ph = p["width"] or width, p["height"] or height
    mask = masks.read_mask(Path(p["mask"]))
    if mask.shape != (original.height, original.width):
        mask = np.asarray(Image.fromarray(mask).resize(original.size, Image.Resampling.LANCZOS))
    if p["invert_mask"]:
        mask = 255 - mask
    blurred = masks.blur(mask, p["mask_blur"])
    if p["inpaint_area"] == "only_masked":
        box = masks.crop_box(blurred, p["only_masked_padding"], pw, ph)
        if box is None:
            raise ValueError(f"the mask {p['mask']} is empty (nothing is white): only_masked "
                             "has nothing to repaint")
        crop = images.resize(original.crop(box), "resize_and_fill", pw, ph)
        crop_mask = images.resize(Image.fromarray(blurred).crop(box), "resize_and_fill", pw, ph)
        return Region(crop, np.asarray(crop_mask), original, masks.overlay_mask(blurred, True),
                      box)
    base = images.resize(original, "just_resize", pw, ph)
    sized = np.asarray(images.resize(Image.fromarray(blurred), "just_resize", pw, ph))
    return Region(base, sized, base, masks.overlay_mask(sized, False), None)


def run(stack: Stack, items: list[Item], on_step: StepCallback | None = None,
        control: list | None = None) -> list[Picture]:
    """``control``: ControlNet units, each map fitted to the processing size (only masked:
    fitted to the picture and cut with the repainted box, as the extension crops it)."""
    p = items[0].params
    regions = [region(item) for item in items]
    tail = denoise_steps.img2img(p["steps"], p["denoise"])
    if tail.run == 0:
        return [Picture(r.base) for r in regions]
    pipe = stack.pipe
    content = p["masked_content"]
    starts = [r.picture if content == "original" else masks.fill(r.picture, r.mask)
              for r in regions]
    init = encode(pipe, starts, stack.device).float()
    h, w = init.shape[2:]
    latent_mask = torch.stack([torch.from_numpy(masks.latent_mask(r.mask, w, h))[None]
                               for r in regions])
    renders = [stage_render(item.render, item.params, item.params["steps"],
                            regions[i].picture.size) for i, item in enumerate(items)]
    if content == "latent_noise":
        hole = torch.stack([randn(r.seed, tuple(init.shape[1:])) for r in renders])
        init = init * (1 - latent_mask) + hole * latent_mask
    elif content == "latent_nothing":
        init = init * (1 - latent_mask)
    nine = pipe.unet.config.in_channels == 9
    conditioning = None
    if nine:
        hard = [np.asarray(r.mask) >= 128 for r in regions]
        masked = [Image.fromarray(np.where(m[..., None], 0, np.asarray(r.picture)).astype(
            np.uint8)) for m, r in zip(hard, regions, strict=True)]
        small = F.interpolate(torch.stack([torch.from_numpy(m.astype(np.float32))[None]
                                           for m in hard]), size=(h, w))
        conditioning = torch.cat([small, encode(pipe, masked, stack.device).float()], dim=1)
    units = control or []
    rows = [[controlnet.at_size(u, *r.picture.size) if r.box is None else
             controlnet.cropped(u, r.base.size, r.box, *r.picture.size) for r in regions]
            for u in units]
    latents = sample_tail(stack, renders, init, tail, on_step,
                          mask=None if nine else latent_mask, image_conditioning=conditioning,
                          control=units, control_rows=rows)
    if not nine:
        latents = latents.float().cpu() * latent_mask + init * (1 - latent_mask)
    out = []
    for r, repainted in zip(regions, decode(pipe, latents.to(stack.device, stack.dtype)),
                            strict=True):
        if r.box is not None:
            x1, y1, x2, y2 = r.box
            pasted = r.base.copy()
            pasted.paste(images.resize(repainted, "crop_and_resize", x2 - x1, y2 - y1), (x1, y1))
            repainted = pasted
        out.append(Picture(images.composite(r.base, repainted, r.overlay)))
    return out
