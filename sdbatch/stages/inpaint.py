"""An inpaint pass with the WebUI's semantics: the mask (white repaints) is blurred in x
and y, the masked part is repainted, and the original is composited back through the
blurred mask, so every pixel outside it keeps its bytes.

- ``masked_content``: ``original`` starts from the picture; ``fill`` from the picture with
  the hole painted in its surrounding colours; ``latent_noise`` from the seed's noise in the
  hole; ``latent_nothing`` from an empty latent there (the last two are filled first too).
- ``inpaint_area``: ``whole_picture`` samples all of it at the processing size;
  ``only_masked`` crops the mask's box plus padding, grown to the processing aspect,
  samples that at the full processing size and pastes it back.
- Every model call's denoised prediction keeps the picture's latents outside the mask, and
  so do the final latents (the WebUI's blend, for every model); 9-channel inpainting models
  also take the mask and the masked picture (its hole mid-grey) as extra input.
- ``only_masked`` with a blank mask is the WebUI's fallback: img2img of the whole picture.
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
    pixels,
    sample_tail,
    stage_render,
)
from sdbatch.stages.picture import Picture
from sdbatch.stages.vae import decode


@dataclass
class Region:
    """One item made ready: what is sampled, where it goes back, through which mask."""

    picture: Image.Image  # the processing-size picture the latents start from
    mask: np.ndarray  # the blurred mask at processing size (latent mask, fill)
    base: Image.Image  # the picture composited over (the original at output size)
    overlay: np.ndarray  # the mask the repaint is composited through, at output size
    box: tuple[int, int, int, int] | None  # only masked: where the repaint is pasted
    plain: bool = False  # a blank mask under only_masked: img2img, as the WebUI falls back


def region(item: Item) -> Region:
    p = item.params
    original = item.source.image
    width, height = p["output_size"]
    pw, ph = p["width"] or width, p["height"] or height
    mask = masks.read_mask(Path(p["mask"]))
    if p["invert_mask"]:
        mask = 255 - mask
    blurred = masks.blur(mask, p["mask_blur"])  # at the mask's own size, as the WebUI blurs
    if p["inpaint_area"] == "only_masked":
        if blurred.shape != (original.height, original.width):
            blurred = np.asarray(Image.fromarray(blurred).resize(original.size,
                                                                 Image.Resampling.LANCZOS))
        box = masks.crop_box(blurred, p["only_masked_padding"], pw, ph)
        if box is None:  # the WebUI: "mask is blank, switch to img2img mode"
            base = images.resize(original, "just_resize", pw, ph)
            whole = np.full((ph, pw), 255, dtype=np.uint8)
            return Region(base, whole, base, whole, None, plain=True)
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
    starts = [r.picture if content == "original" or r.plain else masks.fill(r.picture, r.mask)
              for r in regions]
    init = encode(pipe, starts, stack.device).float().cpu()  # masks and noise are on the CPU
    h, w = init.shape[2:]
    latent_mask = torch.stack([torch.from_numpy(masks.latent_mask(r.mask, w, h))[None]
                               for r in regions])
    renders = [stage_render(item.render, item.params, item.params["steps"],
                            regions[i].picture.size) for i, item in enumerate(items)]
    hole_mask = latent_mask * torch.tensor([0.0 if r.plain else 1.0 for r in regions]
                                           ).view(-1, 1, 1, 1)  # plain: no hole to empty
    if content == "latent_noise":
        hole = torch.stack([randn(r.seed, tuple(init.shape[1:])) for r in renders])
        init = init * (1 - hole_mask) + hole * hole_mask
    elif content == "latent_nothing":
        init = init * (1 - hole_mask)
    conditioning = None
    if pipe.unet.config.in_channels == 9:  # the mask, rounded, and the picture with its
        hard = torch.stack([torch.from_numpy((np.asarray(r.mask) >= 128).astype(np.float32))
                            for r in regions])[:, None]  # hole at 0: mid-grey
        masked = encode(pipe, pixels(starts) * (1 - hard), stack.device).float().cpu()
        conditioning = torch.cat([F.interpolate(hard, size=(h, w)), masked], dim=1)
    units = control or []
    rows = [[controlnet.at_size(u, *r.picture.size) if r.box is None else
             controlnet.cropped(u, r.base.size, r.box, *r.picture.size) for r in regions]
            for u in units]
    latents = sample_tail(stack, renders, init, tail, on_step, mask=latent_mask,
                          image_conditioning=conditioning, control=units, control_rows=rows)
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
