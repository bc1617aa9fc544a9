"""The local executor: the plan's batches in order on one device, each stack loaded once.

A batch's calls take their inputs from the intermediates (memory, or the run folder's
disk copy after a resume); what a later call needs is kept there under its key. A batch
whose input failed fails too, with the reason, so every image of a failed chain is
reported once and the others go on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from sdbatch import control, seamless
from sdbatch.executors.intermediates import ControlMaps, Intermediates
from sdbatch.images import read_image
from sdbatch.models import stack as stacks
from sdbatch.models.image_models import ImageModels
from sdbatch.models.upscaler_models import UpscalerModels
from sdbatch.plan import Batch, StageCall
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


@dataclass
class BatchResult:
    batch: Batch
    pictures: list[Picture] | None  # one per call of the batch
    error: str | None
    seconds: float


def load_image(call: StageCall) -> Picture:
    return Picture(read_image(call.params["path"]))


def _items(batch: Batch, store: Intermediates) -> list[Item]:
    """A post-step batch's calls with the pictures they start from."""
    return [Item(r, c.params, store.get(c.input_key))
            for r, c in zip(batch.renders, batch.calls, strict=True)]


def _control(batch: Batch, stack: stacks.Stack,
             networks: dict[tuple[str, str], stacks.NetworkFile],
             maps: ControlMaps) -> list[control.Unit]:
    """The batch's ControlNet units (its calls share them: plan groups on them)."""
    return [control.Unit(u, stack.controlnet(networks[("controlnet", u["model"])].path),
                         maps.get(u))
            for u in batch.calls[0].params.get("controlnet", ())] if batch.calls else []


def execute(batches: Iterable[Batch], specs: dict[str, stacks.StackSpec],
            cache: stacks.StackCache,
            networks: dict[tuple[str, str], stacks.NetworkFile] | None = None,
            on_step: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            store: Intermediates | None = None,
            consumers: dict[str, int] | None = None,
            vae_tile_px: int = 1024,
            upscalers: UpscalerModels | None = None,
            restorers: ImageModels | None = None,
            maps: ControlMaps | None = None) -> Iterator[BatchResult]:
    """Render batches in order; a failing batch is reported and the next one goes on.

    Each batch's stack comes from the cache (loaded on first use, its LoRAs checked against
    it); a stack that cannot load stops the run: that is a broken model, not a broken image.
    ``consumers`` counts the calls that take each key's output: such outputs go to
    ``store``, and leave its memory when their last consumer is done. Pictures with a side
    over ``vae_tile_px`` go through the VAE in tiles; a batch's ``tiling`` wraps the
    model's convolutions for that batch only. ``upscalers`` holds the run's upscaler
    models, each loaded on first use and released when the batches are done; ``restorers``
    the face restorers. What a stage found about a picture is filed in its ``chain_found``
    under its call key, after what the chain before it found. A batch's ControlNet units
    come with their models (loaded once per stack) and their preprocessed maps (``maps``,
    once per run).
    """
    try:
        yield from _execute(batches, specs, cache, networks or {}, on_step, should_stop,
                            store, dict(consumers or {}), vae_tile_px, upscalers, restorers,
                            maps or ControlMaps(None))
    finally:
        if upscalers is not None:
            upscalers.release()


def _execute(batches, specs, cache, networks, on_step, should_stop, store, consumers,
             vae_tile_px, upscalers, restorers, maps) -> Iterator[BatchResult]:
    by_identity = {s.identity: s for s in specs.values()}
    failed: dict[str, str] = {}
    checked: set[str] = set()
    stack = None
    for batch in batches:
        if should_stop():
            return
        start = time.perf_counter()
        lost = [failed[c.input_key] for c in batch.calls if c.input_key in failed]
        if lost:
            error = f"its input failed: {lost[0].splitlines()[0]}"
            failed.update({c.key: error for c in batch.calls})
            yield BatchResult(batch, None, error, 0.0)
            continue
        try:
            items = [] if batch.kind in ("image", "txt2img") else _items(batch, store)
            if batch.kind == "image":
                pictures = [load_image(c) for c in batch.calls]
            elif batch.kind in NO_STACK:
                extra = {"models": upscalers} if batch.kind == "upscale" else {}
                pictures = STAGES[batch.kind](None, items, on_step, restorers=restorers,
                                              **extra)
            else:
                spec = by_identity[batch.calls[0].stack] if batch.calls else \
                    specs[batch.renders[0].checkpoint]
                if stack is None or stack.spec.identity != spec.identity:
                    stack = None  # let the cache release it before the next stack loads
                    stack = cache.get(spec)
                if spec.identity not in checked:
                    try:
                        stack.check_loras([f.path for (kind, _), f in networks.items()
                                           if kind == "lora"])
                    except ValueError as e:
                        raise stacks.StackLoadError(str(e)) from e
                    checked.add(spec.identity)
                seamless.vae_tiles(stack.pipe.vae, vae_tile_px)
                first = batch.renders[0]
                stack.use_networks([(networks[("lora", n)].path, w) for n, w in first.loras],
                                   [(networks[("hypernet", n)].path, w)
                                    for n, w in first.hypernetworks])
                units = _control(batch, stack, networks, maps)
                extra = {"control": units} if units else {}
                with seamless.tiling([stack.pipe.unet, stack.pipe.vae], first.tiling):
                    if batch.kind == "txt2img":
                        pictures = STAGES["txt2img"](stack, batch.renders, on_step, **extra)
                    elif batch.kind in UPSCALING:
                        pictures = STAGES[batch.kind](stack, items, on_step,
                                                      models=upscalers, **extra)
                    else:
                        pictures = STAGES[batch.kind](stack, items, on_step, **extra)
        except stacks.StackLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - one batch's failure must not lose the others
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            failed.update({c.key: error for c in batch.calls})
            yield BatchResult(batch, None, error, time.perf_counter() - start)
            continue
        for item, call, picture in zip(items, batch.calls, pictures, strict=False):
            picture.chain_found = {**item.source.chain_found,
                                   **({call.key: picture.found} if picture.found else {})}
        for call, picture in zip(batch.calls, pictures, strict=True):
            if consumers.get(call.key) and store is not None:
                store.put(call.key, picture)
            if call.input_key is not None and store is not None:
                consumers[call.input_key] -= 1
                if consumers[call.input_key] <= 0:
                    store.release(call.input_key)
        yield BatchResult(batch, pictures, None, time.perf_counter() - start)
