"""Job -> the list of images to render (Renders).

Every key given as a list is an axis; axes are crossed in schema order (first = outermost),
a zip group moves its axes together at the place of its first member. Each combination
(cell) yields batch_count x batch_size images whose seeds run seed, seed+1, ... as in the
WebUI. A seed of -1 is drawn from the run's seed nonce, so a resumed run draws it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

from sdbatch import samplers, schema
from sdbatch.schema import Job


@dataclass(frozen=True)
class Render:
    """One image's generation parameters, canonical (sampler and schedule type resolved)."""

    index: int
    cell: int
    checkpoint: str
    prompt: str
    negative_prompt: str
    sampler: str
    schedule_type: str
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    clip_skip: int

    def params(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["index"], d["cell"], d["checkpoint"]  # the stack's identity stands for it
        return d


def values(x: Any) -> tuple:
    """An axis's values: a list's items, or the one value."""
    return x if isinstance(x, tuple) else (x,)


def random_seed(nonce: int, slot: int) -> int:
    """The seed drawn for the slot-th value -1 of the seed axis: a pure function of the nonce."""
    digest = hashlib.sha256(f"{nonce}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (schema.MAX_SEED + 1)


def resolve_seeds(job: Job, nonce: int) -> Job:
    """The job with every -1 seed replaced by its drawn seed."""
    seeds = tuple(random_seed(nonce, i) if s == -1 else s
                  for i, s in enumerate(values(job.params.seed)))
    value = seeds if isinstance(job.params.seed, tuple) else seeds[0]
    return dataclasses.replace(job, params=dataclasses.replace(job.params, seed=value))


def _axes(job: Job) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """[(keys, rows)]: one entry per independent axis; a zip group is one axis of many keys."""
    zipped = {name: g for g, group in enumerate(job.zip) for name in group}
    axes: list[tuple[tuple[str, ...], list[tuple]]] = []
    done: set[int] = set()
    for key in schema.axes().values():
        if key in zipped:
            g = zipped[key]
            if g in done:
                continue
            done.add(g)
            keys = job.zip[g]
            axes.append((keys, list(zip(*(values(schema.get(job, k)) for k in keys),
                                        strict=True))))
        else:
            axes.append(((key,), [(v,) for v in values(schema.get(job, key))]))
    return axes


def cells(job: Job) -> int:
    n = 1
    for _, rows in _axes(job):
        n *= len(rows)
    return n


def count(job: Job) -> int:
    """How many images the job makes; known before any seed is drawn."""
    return cells(job) * job.params.batch_count * job.params.batch_size


def expand(job: Job) -> list[Render]:
    """Every image of a job whose seeds are resolved, in matrix order."""
    axes = _axes(job)
    per_cell = job.params.batch_count * job.params.batch_size
    renders = []
    for cell, combo in enumerate(itertools.product(*(rows for _, rows in axes))):
        values = {k: v for (keys, _), row in zip(axes, combo, strict=True)
                  for k, v in zip(keys, row, strict=True)}
        seed = values["params.seed"]
        if seed == -1:
            raise ValueError("expand() needs resolved seeds: call resolve_seeds() first")
        sampler, schedule_type = samplers.split(values["params.sampler"],
                                                values["params.schedule_type"])
        for i in range(per_cell):
            renders.append(Render(
                index=len(renders), cell=cell, checkpoint=values["model.checkpoint"],
                prompt=values["prompt"],
                negative_prompt=values["negative_prompt"], sampler=sampler,
                schedule_type=schedule_type, steps=values["params.steps"],
                cfg_scale=values["params.cfg_scale"], seed=seed + i,
                width=values["params.width"], height=values["params.height"],
                clip_skip=values["params.clip_skip"],
            ))
    return renders
