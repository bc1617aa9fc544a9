"""The WebUI's SD upscale script: the picture is upscaled by ``scale``, cut into tiles of
the processing width x height overlapping by ``tile_overlap`` (sdbatch.tiles), each tile is
img2img'd with its own seed, and the tiles are blended back across the overlaps.

Tiles go through the model ``batch_size`` at a time, each forward pass encoding, sampling
and decoding only its own tiles, so memory stays that of one batch of tiles however large
the picture grows; only the pictures themselves grow.
"""

from __future__ import annotations

import dataclasses

from sdbatch import control as controlnet
from sdbatch import denoise_steps, tiles, upscalers
from sdbatch.models.stack import Stack
from sdbatch.models.upscaler_models import UpscalerModels
from sdbatch.stages.common import Item, StepCallback, encode, sample_tail, stage_render
from sdbatch.stages.picture import Picture
from sdbatch.stages.vae import decode


def upscale_one(stack: Stack, item: Item, on_step: StepCallback | None = None,
                models: UpscalerModels | None = None, control: list | None = None
                ) -> Picture:
    """``models``: the run's upscaler models; ``control``: ControlNet units, each map
    fitted to the upscaled picture and cut with the tiles, so every tile sees its own part
    of it."""
    p = item.params
    model = models.pass_of(p["upscaler"]) if models else None
    big = upscalers.upscale(item.source.image, p["scale"], p["upscaler"], model)
    grid = tiles.layout(*big.size, p["width"], p["height"], p["tile_overlap"])
    tail = denoise_steps.img2img(p["steps"], p["denoise"])
    pieces = tiles.split(big, grid)
    if tail.run == 0:
        return Picture(tiles.blend(pieces, grid))
    seeds = tiles.tile_seeds(p["seed"], p["subseed"], len(pieces), p["batch_size"],
                             p["subseed_strength"] > 0)
    units = control or []
    maps = [controlnet.tile_maps(u, big.size, grid) for u in units]
    done: list = []
    for start in range(0, len(pieces), p["batch_size"]):
        part = pieces[start:start + p["batch_size"]]
        renders = [dataclasses.replace(stage_render(item.render, p, p["steps"],
                                                    (grid.tile_w, grid.tile_h)),
                                       seed=seed, subseed=subseed)
                   for seed, subseed in seeds[start:start + len(part)]]
        latents = encode(stack.pipe, part, stack.device)
        extra = {"control": units, "control_rows": [m[start:start + len(part)]
                                                    for m in maps]} if units else {}
        done += decode(stack.pipe, sample_tail(stack, renders, latents, tail, on_step,
                                               **extra))
    return Picture(tiles.blend(done, grid))


def run(stack: Stack, items: list[Item], on_step: StepCallback | None = None,
        models: UpscalerModels | None = None, control: list | None = None) -> list[Picture]:
    return [upscale_one(stack, item, on_step, models=models, control=control)
            for item in items]
