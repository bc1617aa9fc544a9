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
from pathlib import Path
from typing import Any

from sdbatch import sampler_names, schema
from sdbatch.models import names, tiny
from sdbatch.prompts.dynamic import DynamicPrompts
from sdbatch.prompts.parser import extract_extra_networks, lora_weight
from sdbatch.prompts.triggers import triggered
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
    subseed: int = 0
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    eta: float | None = None
    ensd: int = 0
    tiling: str = "false"
    # (name, weight): the stack's, then the prompt's; a LoRA's weight may be (te, unet)
    loras: tuple[tuple[str, Any], ...] = ()
    hypernetworks: tuple[tuple[str, float], ...] = ()
    embeddings: tuple[str, ...] = ()  # triggers in the prompt, then the negative prompt
    init_image: str | None = None  # the chain starts from this picture, not from txt2img
    post: tuple[Step, ...] = ()
    controlnet: tuple[Unit, ...] = ()  # the job's ControlNet units, one value per key

    def params(self) -> dict[str, Any]:
        """The txt2img call's parameters (ControlNet units only where there are some, so
        the keys of jobs without them stay as they were)."""
        d = dataclasses.asdict(self)
        for name in ("index", "cell", "checkpoint", "init_image", "post", "controlnet"):
            del d[name]  # the stack's identity stands for the checkpoint; the rest are stages
        if self.controlnet:
            d["controlnet"] = unit_dicts(self.controlnet)
        return d


Unit = tuple[tuple[str, Any], ...]  # one ControlNet unit: (key, value) pairs, sorted


def unit_dicts(units: tuple[Unit, ...]) -> list[dict[str, Any]]:
    return [dict(u) for u in units]


def units_of(values: dict[str, Any], prefix: str, count: int) -> tuple[Unit, ...]:
    """The ``count`` units whose keys are ``[prefix]controlnet.N.key`` in a cell's values."""
    out = []
    for n in range(count):
        head = f"{prefix}controlnet.{n}."
        out.append(tuple(sorted((k[len(head):], v) for k, v in values.items()
                                if k.startswith(head))))
    return tuple(out)


@dataclass(frozen=True)
class Step:
    """One post-step of one image, every key a single value, the image's own filled in
    where the job left a sampling key unset."""

    kind: str
    values: tuple[tuple[str, Any], ...]

    def params(self) -> dict[str, Any]:
        d = dict(self.values)
        if "controlnet" in d:
            units = d.pop("controlnet")
            if units:
                d["controlnet"] = unit_dicts(units)
        return d

    def __getitem__(self, key: str) -> Any:
        return dict(self.values)[key]


def post_step(kind: str, given: dict[str, Any], base: Render, position: int,
              batch_size: int = 1, units: tuple[Unit, ...] | None = None,
              schedule: str = "Automatic") -> Step:
    """A post-step's values for one image: unset sampling keys take the image's (a step
    that sets only its sampler takes the image's ``schedule`` as the job asked it, where
    that sampler takes it); a seed the step sets counts up within the cell as the image's
    seeds do. SD upscale's tiles are the
    image's processing size unless set, and go batch_size to a forward pass (which sets
    their seeds, as in the WebUI's script). An upscale or a face restoration samples
    nothing: it takes nothing."""
    v = dict(given)
    if kind in ("upscale", "face_restore"):
        return Step(kind, tuple(sorted(v.items())))
    v["controlnet"] = base.controlnet if units is None else units  # unset: the job's
    if kind == "sd_upscale":
        v["width"], v["height"] = v["width"] or base.width, v["height"] or base.height
        v["batch_size"] = batch_size
    if v.get("sampler") is None and v.get("schedule_type") is None:
        v["sampler"], v["schedule_type"] = base.sampler, base.schedule_type
    else:
        sampler = v.get("sampler") or base.sampler
        v["sampler"], v["schedule_type"] = sampler_names.split(
            sampler, v.get("schedule_type") or sampler_names.inherited(sampler, schedule))
    for name in ("prompt", "negative_prompt", "cfg_scale"):
        if v.get(name) is None:
            v[name] = getattr(base, name)
    # a step's own seed counts up within a cell as the image's do: not under a variation
    # strength, where the seed stays and the variation seed counts up
    v["seed"] = base.seed if v.get("seed") is None else v["seed"] + (
        0 if base.subseed_strength > 0 else position)
    if not v.get("steps"):
        v["steps"] = base.steps
    if kind == "hires_fix" and v.get("checkpoint") is None:
        v["checkpoint"] = base.checkpoint
    return Step(kind, tuple(sorted(v.items())))


def _step_units(step, values: dict[str, Any], n: int) -> tuple[Unit, ...] | None:
    """A post-step's own ControlNet units, or None: it takes the job's."""
    own = getattr(step.step, "controlnet", None)
    return None if own is None else units_of(values, f"post.{n}.{step.kind}.", len(own))


def checkpoints(job: Job) -> list[str]:
    """Every checkpoint the job names: the model's (an axis), then the post-steps' own."""
    found = list(values(job.model.checkpoint))
    for step in job.post:
        if step.kind == "hires_fix" and step.hires_fix.checkpoint is not None:
            found += values(step.hires_fix.checkpoint)
    return list(dict.fromkeys(found))


def values(x: Any) -> tuple:
    """An axis's values: a list's items, or the one value."""
    return x if isinstance(x, tuple) else (x,)


def random_seed(nonce: int, slot: int, axis: str = "seed") -> int:
    """The seed drawn for the slot-th value -1 of a seed axis: a pure function of the nonce."""
    tag = f"{nonce}/{slot}" if axis == "seed" else f"{nonce}/{axis}/{slot}"
    digest = hashlib.sha256(tag.encode()).digest()
    return int.from_bytes(digest[:8], "big") % (schema.MAX_SEED + 1)


def resolve_seeds(job: Job, nonce: int) -> Job:
    """The job with every -1 seed and subseed replaced by its drawn value.

    Without a variation strength the subseed is unused and set to 0, so that nothing random
    ends up in the recipe of a job with fixed seeds (its PNGs stay byte-identical)."""
    changes = {}
    unused = all(s == 0 for s in values(job.params.subseed_strength))
    for axis in ("seed", "subseed"):
        given = getattr(job.params, axis)
        drawn = tuple(0 if axis == "subseed" and unused else
                      random_seed(nonce, i, axis) if s == -1 else s
                      for i, s in enumerate(values(given)))
        changes[axis] = drawn if isinstance(given, tuple) else drawn[0]
    return dataclasses.replace(job, params=dataclasses.replace(job.params, **changes))


def axes(job: Job) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """[(keys, rows)]: one entry per independent axis; a zip group is one axis of many keys."""
    zipped = {name: g for g, group in enumerate(job.zip) for name in group}
    axes: list[tuple[tuple[str, ...], list[tuple]]] = []
    done: set[int] = set()
    for key in schema.all_axes(job).values():
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


def networks(job: Job, prompt: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """(loras, hypernetworks) of one image: the stack's, then the prompt's <lora:...> tags
    (<lyco:...> too). A LoRA's weight is one number, or (te, unet) when the text encoder and
    the UNet take different ones (see parser.lora_weight).

    A tag naming a network of the stack (same name, with or without extension) replaces
    the stack's weight, in the stack's place, as the prompt is the more specific and is
    what the WebUI reads. A LoRA tagged n times is applied as the WebUI applies it: n times
    with the last tag's weights, so at n times them. A hypernetwork tagged twice is applied
    once at the last tag's strength (the WebUI chains one copy per tag). A tag
    that cannot be applied (ExtraNetwork.problem) is left out here and refused by
    model_specs.resolve_networks before any work.
    """
    found: dict[str, dict[str, tuple[str, Any]]] = {
        "lora": {names.stem(n.name): (n.name, lora_weight(*n.parts())) for n in job.model.loras},
        "hypernet": {names.stem(n.name): (n.name, n.weight) for n in job.model.hypernetworks}}
    tagged: dict[str, int] = {}
    for tag in extract_extra_networks(prompt)[1]:
        if tag.network in found and tag.problem() is None:
            stem = names.stem(tag.name)
            if tag.network == "lora":
                tagged[stem] = tagged.get(stem, 0) + 1
                te, unet = tag.multipliers()
                weight = lora_weight(te * tagged[stem], unet * tagged[stem])
            else:
                weight = tag.multipliers()[0]
            found[tag.network][stem] = (tag.name, weight)
    return tuple(found["lora"].values()), tuple(found["hypernet"].values())


def embedding_triggers(job: Job) -> list[str]:
    """Every embedding a prompt of the job may trigger: each file under embeddings/ of
    paths.models (and of the tiny family on `tiny`) and each of model.embeddings."""
    roots = [Path(job.paths.models).expanduser() if job.paths.models else None]
    if "tiny" in values(job.model.checkpoint):
        roots.append(tiny.family_models())
    found = names.embeddings_in([r for r in roots if r is None or r.is_dir()])
    return [*found, *(names.stem(Path(e).name) for e in job.model.embeddings)]


def cells(job: Job) -> int:
    n = 1
    for _, rows in axes(job):
        n *= len(rows)
    return n


def count(job: Job) -> int:
    """How many images the job makes; known before any seed is drawn."""
    return cells(job) * job.params.batch_count * job.params.batch_size


def expand(job: Job, picked: dict[int, tuple[str, str]] | None = None) -> list[Render]:
    """Every image of a job whose seeds are resolved, in matrix order.

    ``picked`` gives images their (prompt, negative prompt) as recorded, instead of picking
    them again in random dynamic-prompt mode (reproduce: the wildcard files may be gone)."""
    crossed = axes(job)
    p = job.params
    per_cell = p.batch_count * p.batch_size
    dynamic = (DynamicPrompts("random", Path(job.paths.wildcards), 1)
               if job.dynamic_prompts.mode == "random" else None)
    triggers = embedding_triggers(job)
    renders: list[Render] = []
    for cell, combo in enumerate(itertools.product(*(rows for _, rows in crossed))):
        values = {k: v for (keys, _), row in zip(crossed, combo, strict=True)
                  for k, v in zip(keys, row, strict=True)}
        seed, subseed = values["params.seed"], values["params.subseed"]
        if seed == -1 or subseed == -1:
            raise ValueError("expand() needs resolved seeds: call resolve_seeds() first")
        strength = values["params.subseed_strength"]
        sampler, schedule_type = sampler_names.split(values["params.sampler"],
                                                values["params.schedule_type"])
        asked = sampler_names.given_schedule(values["params.sampler"],
                                             values["params.schedule_type"])
        for i in range(per_cell):
            # the WebUI: with a variation strength the seed stays and the subseed counts up
            image_seed, image_subseed = (seed, subseed + i) if strength > 0 else (seed + i,
                                                                                   subseed)
            prompt, negative = values["prompt"], values["negative_prompt"]
            if picked and len(renders) in picked:
                prompt, negative = picked[len(renders)]
            elif dynamic:
                prompt = dynamic.pick(prompt, image_seed)
                negative = dynamic.pick(negative, image_seed)
            loras, hypernets = networks(job, prompt)
            base = Render(
                index=len(renders), cell=cell, checkpoint=values["model.checkpoint"],
                prompt=prompt, negative_prompt=negative, sampler=sampler,
                schedule_type=schedule_type, steps=values["params.steps"],
                cfg_scale=values["params.cfg_scale"], seed=image_seed,
                width=values["params.width"], height=values["params.height"],
                clip_skip=values["params.clip_skip"], subseed=image_subseed,
                subseed_strength=strength,
                seed_resize_from_w=values["params.seed_resize_from_w"],
                seed_resize_from_h=values["params.seed_resize_from_h"],
                eta=values["params.eta"], ensd=values["params.ensd"],
                tiling=values["params.tiling"],
                loras=loras, hypernetworks=hypernets,
                init_image=values["init_image"],
                controlnet=units_of(values, "", len(job.controlnet)),
            )
            post = tuple(post_step(step.kind, {k.rsplit(".", 1)[1]: v for k, v in values.items()
                                               if k.startswith(f"post.{n}.")
                                               and ".controlnet." not in k}, base, i,
                                   p.batch_size, _step_units(step, values, n), asked)
                         for n, step in enumerate(job.post))
            steps_text = [dict(s.values).get(k) or "" for s in post
                          for k in ("prompt", "negative_prompt")]
            embeddings = triggered([extract_extra_networks(prompt)[0], negative,
                                    *(extract_extra_networks(t)[0] for t in steps_text)],
                                   triggers)  # a step's own prompt may name one too
            renders.append(dataclasses.replace(base, post=post, embeddings=embeddings))
    return renders
