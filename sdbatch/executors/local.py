"""The local executor: every batch on one device, the stack loaded once."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

from sdbatch.models import stack as stacks
from sdbatch.plan import Batch
from sdbatch.stages import txt2img

STAGES = {"txt2img": txt2img.run}


@dataclass
class BatchResult:
    batch: Batch
    images: list[Image.Image] | None
    error: str | None
    seconds: float


def execute(batches: Iterable[Batch], specs: dict[str, stacks.StackSpec],
            cache: stacks.StackCache,
            networks: dict[tuple[str, str], stacks.NetworkFile] | None = None,
            on_step: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False) -> Iterator[BatchResult]:
    """Render batches in order; a failing batch is reported and the next one goes on.

    Each batch's stack comes from the cache (loaded on first use, its LoRAs checked against
    it); a stack that cannot load stops the run: that is a broken model, not a broken image.
    """
    networks = networks or {}
    checked: set[str] = set()
    stack = None
    for batch in batches:
        if should_stop():
            return
        spec = specs[batch.renders[0].checkpoint]
        if stack is None or stack.spec.identity != spec.identity:
            stack = None  # let the cache release it before the next stack loads
            stack = cache.get(spec)
        if spec.identity not in checked:
            try:
                stack.check_loras([f.path for (kind, _), f in networks.items() if kind == "lora"])
            except ValueError as e:
                raise stacks.StackLoadError(str(e)) from e
            checked.add(spec.identity)
        first = batch.renders[0]
        start = time.perf_counter()
        try:
            stack.use_networks([(networks[("lora", n)].path, w) for n, w in first.loras],
                               [(networks[("hypernet", n)].path, w)
                                for n, w in first.hypernetworks])
            images = STAGES[batch.kind](stack, batch.renders, on_step)
        except Exception as e:  # noqa: BLE001 - one batch's failure must not lose the others
            yield BatchResult(batch, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                              time.perf_counter() - start)
            continue
        yield BatchResult(batch, images, None, time.perf_counter() - start)
