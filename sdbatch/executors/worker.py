"""A worker renders one batch at a time on its device and keeps what is costly to make
again between batches: loaded stacks (with their ControlNets), upscaler models and face
restorers. Every executor runs its batches through workers: one in the run's own process
(local), one process per device (multi), one Ray actor per GPU (ray). What a batch needs
beyond that (its input pictures, its control maps) comes with it, so a batch gives the
same bytes on any worker.

Out of memory, a batch is run again in two halves, then with the VAE in tiles; the outcome
says which, and the manifest records it with each image.
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from sdbatch import control, seamless
from sdbatch.images import read_image
from sdbatch.models import stack as stacks
from sdbatch.models.image_models import ImageModelFile, ImageModels
from sdbatch.models.upscaler_models import UpscalerFile, UpscalerModels
from sdbatch.plan import Batch
from sdbatch.preprocessor_names import RECOLOR
from sdbatch.stages import (
    face_restore,
    hires_fix,
    img2img,
    inpaint,
    sd_upscale,
    txt2img,
    upscale,
)
from sdbatch.stages.common import Item
from sdbatch.stages.picture import Picture

STAGES = {"txt2img": txt2img.run, "img2img": img2img.run, "hires_fix": hires_fix.run,
          "inpaint": inpaint.run, "sd_upscale": sd_upscale.run, "upscale": upscale.run,
          "face_restore": face_restore.run}
UPSCALING = ("hires_fix", "sd_upscale")  # diffusion stages that take upscaler models
NO_STACK = ("upscale", "face_restore")  # post-steps that load image models, not a stack
OOM_VAE_TILE_PX = 512  # the VAE's tile side for a batch that ran out of memory whole
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Setup:
    """What every worker of a run is given once; plain data, so a spawned process or a
    Ray actor can take it."""

    specs: dict[str, stacks.StackSpec]  # by stack identity
    networks: dict[tuple[str, str], stacks.NetworkFile]  # (kind, name): LoRA, hypernet, CN
    upscalers: dict[str, UpscalerFile]  # by the job's name for the model
    restorers: dict[str, ImageModelFile]  # by sha256
    dtype: str = "auto"  # model.dtype: upscaler models follow it where they can
    allow_pickle: bool = False
    vae_tile_px: int = 1024
    upscaler_tile_px: int = 192
    upscaler_tile_overlap: int = 8
    stack_cache_gb: float = 0.0
    # stack identity -> the LoRAs its batches apply: checked against it when it loads
    loras_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # call key -> what running out of memory took when it was made ("split", "vae_tiling"):
    # reproduce and verify render such a call's batch the same way, whatever memory is free
    oom_retries: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One batch as a worker gets it: the pictures its calls start from (by input key;
    None where the worker kept that picture itself), the control maps of its units (by
    map key), and the keys of its outputs to keep for a later batch (``keep``) or to let
    go (``forget``)."""

    batch: Batch
    inputs: dict[str, Picture | None] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    keep: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()


@dataclass
class Outcome:
    pictures: list[Picture] | None  # one per call of the batch
    error: str | None
    seconds: float
    retries: tuple[str, ...] = ()  # "split", "vae_tiling": what running out of memory took
    machine: dict[str, Any] | None = None  # where it was drawn: device, name, threads


def halves(batch: Batch) -> list[Batch]:
    """The batch's calls in two forward passes (the first one larger when odd)."""
    cut = (len(batch.calls) + 1) // 2
    return [replace(batch, renders=batch.renders[:cut], calls=batch.calls[:cut]),
            replace(batch, renders=batch.renders[cut:], calls=batch.calls[cut:])]


def ends_the_task(e: BaseException) -> bool:
    """submitit's signal handler raises UncompletedJobError (a RuntimeError) when SLURM's time
    is up and the task will not be requeued: it ends the task, it is no batch's failure."""
    utils = sys.modules.get("submitit.core.utils")
    return utils is not None and isinstance(e, utils.UncompletedJobError)


class Worker:
    def __init__(self, setup: Setup, device: torch.device):
        self.setup = setup
        self.device = device
        self.cache = stacks.StackCache(device, setup.stack_cache_gb)
        self.upscalers = UpscalerModels(setup.upscalers, device,
                                        stacks.pick_dtype(setup.dtype, device),
                                        setup.allow_pickle, setup.upscaler_tile_px,
                                        setup.upscaler_tile_overlap)
        self.restorers = ImageModels(setup.restorers, device, setup.allow_pickle)
        self.stack: stacks.Stack | None = None
        self.checked: set[str] = set()
        self.kept: dict[str, Picture] = {}

    @property
    def holds(self) -> str | None:
        """The identity of the stack loaded now."""
        return None if self.stack is None else self.stack.spec.identity

    def run(self, task: Task, on_step: StepCallback | None = None) -> Outcome:
        """Render the task's batch; a failure is the outcome's error, except a stack that
        cannot load (StackLoadError), which stops the run."""
        for key in task.forget:
            self.kept.pop(key, None)
        inputs = {k: v if v is not None else self.kept[k] for k, v in task.inputs.items()}
        start = time.perf_counter()
        try:
            pictures, retries = self._fitting(task.batch, inputs, task.maps, on_step)
        except stacks.StackLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - one batch's failure must not lose the others
            if ends_the_task(e):
                raise
            return Outcome(None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                           time.perf_counter() - start)
        for call, picture in zip(task.batch.calls, pictures, strict=True):
            if retries:  # the stage's record says so: it is how these pixels were made
                picture.found = {**picture.found, "oom_retries": list(retries)}
            earlier = {} if call.input_key is None else inputs[call.input_key].chain_found
            picture.chain_found = {**earlier,
                                   **({call.key: picture.found} if picture.found else {})}
            if call.key in task.keep:
                self.kept[call.key] = picture
        return Outcome(pictures, None, time.perf_counter() - start, retries,
                       stacks.machine(self.device))

    def release(self) -> None:
        self.upscalers.release()
        self.restorers.release()

    def _fitting(self, batch: Batch, inputs: dict[str, Picture], maps: dict[str, np.ndarray],
                 on_step: StepCallback | None) -> tuple[list[Picture], tuple[str, ...]]:
        """The batch whole; out of memory, in halves; then in halves with the VAE tiled. A
        batch whose calls were made after running out of memory (Setup.oom_retries) starts
        where they ended, so its passes and pixels are those of the run."""
        tries = [((batch,), self.setup.vae_tile_px, ())]
        if len(batch.calls) > 1:
            tries.append((tuple(halves(batch)), self.setup.vae_tile_px, ("split",)))
        tries.append((tuple(halves(batch)) if len(batch.calls) > 1 else (batch,),
                      min(OOM_VAE_TILE_PX, self.setup.vae_tile_px), tries[-1][2] +
                      ("vae_tiling",)))
        forced = self.setup.oom_retries
        made = {forced[c.key] for c in batch.calls if c.key in forced}
        tries = tries[next((n for n, t in enumerate(tries) if t[2] in made), 0):]
        for n, (parts, vae_tile_px, retries) in enumerate(tries):
            try:
                return [p for part in parts for p in
                        self._render(part, inputs, maps, on_step, vae_tile_px)], retries
            except Exception as e:
                if not stacks.is_out_of_memory(e) or n == len(tries) - 1:
                    raise
                self._free()
        raise AssertionError("unreachable")

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _render(self, batch: Batch, inputs: dict[str, Picture], maps: dict[str, np.ndarray],
                on_step: StepCallback | None, vae_tile_px: int) -> list[Picture]:
        if batch.kind == "image":
            return [Picture(read_image(c.params["path"])) for c in batch.calls]
        items = [] if batch.kind == "txt2img" else [
            Item(r, c.params, inputs[c.input_key])
            for r, c in zip(batch.renders, batch.calls, strict=True)]
        if batch.kind in NO_STACK:
            extra: dict[str, Any] = {"models": self.upscalers} if batch.kind == "upscale" else {}
            return STAGES[batch.kind](None, items, on_step, restorers=self.restorers, **extra)
        stack = self._stack(batch)
        seamless.vae_tiles(stack.pipe.vae, vae_tile_px)
        first = batch.renders[0]
        networks = self.setup.networks
        stack.use_networks([(networks[("lora", n)].path, w) for n, w in first.loras],
                           [(networks[("hypernet", n)].path, w) for n, w in first.hypernetworks])
        units = [control.Unit(u, stack.controlnet(networks[("controlnet", u["model"])].path),
                              maps[u["map"]])
                 for u in batch.calls[0].params.get("controlnet", ())]
        extra = {"control": units} if units else {}
        with seamless.tiling([stack.pipe.unet, stack.pipe.vae], first.tiling):
            if batch.kind == "txt2img":
                pictures = STAGES["txt2img"](stack, batch.renders, on_step, **extra)
            elif batch.kind in UPSCALING:
                pictures = STAGES[batch.kind](stack, items, on_step, models=self.upscalers,
                                              **extra)
            else:
                pictures = STAGES[batch.kind](stack, items, on_step, **extra)
        if batch.calls[0].params.get("recolor"):
            pictures = [_recolored(p, units) for p in pictures]
        return pictures

    def _stack(self, batch: Batch) -> stacks.Stack:
        """The batch's stack, loaded (the one before released first) and the LoRAs its
        batches apply checked against it once (another checkpoint's may be of another
        family)."""
        spec = self.setup.specs[batch.calls[0].stack]
        if self.stack is None or self.stack.spec.identity != spec.identity:
            self.stack = None  # let the cache release it before the next stack loads
            self.stack = self.cache.get(spec)
        if spec.identity not in self.checked:
            try:
                self.stack.check_loras([self.setup.networks[("lora", name)].path
                                        for name in self.setup.loras_of.get(spec.identity, ())])
            except ValueError as e:
                raise stacks.StackLoadError(str(e)) from e
            self.checked.add(spec.identity)
        return self.stack


def _recolored(picture: Picture, units: list[control.Unit]) -> Picture:
    """A finished picture with its recolor units' post-processing (plan.recolors), in unit
    order; made in pixel space from here on."""
    image = picture.image
    for u in units:
        if u.params["preprocessor"] in RECOLOR:
            image = control.recolored(image, control.at_size(u, *image.size),
                                      u.params["preprocessor"])
    return replace(picture, image=image, latents=None)
