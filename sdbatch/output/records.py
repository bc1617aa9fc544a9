"""What is written about each image: its infotext, its recipe and its manifest entry."""

from __future__ import annotations

from typing import Any

from sdbatch import __version__
from sdbatch.matrix import Render
from sdbatch.models import names
from sdbatch.models.stack import StackSpec
from sdbatch.output.infotext import format_infotext, number
from sdbatch.plan import StageCall


def infotext(render: Render, spec: StackSpec) -> str:
    params = {
        "Steps": render.steps,
        "Sampler": render.sampler,
        "Schedule type": render.schedule_type,
        "CFG scale": number(render.cfg_scale),
        "Seed": render.seed,
        "Size": f"{render.width}x{render.height}",
        "Model hash": spec.model_hash,
        "Model": spec.name,
        "VAE hash": spec.vae_hash,
        "VAE": names.stem(spec.vae.name) if spec.vae else None,
        "Variation seed": render.subseed if render.subseed_strength > 0 else None,
        "Variation seed strength": (number(render.subseed_strength)
                                    if render.subseed_strength > 0 else None),
        "Seed resize from": (f"{render.seed_resize_from_w}x{render.seed_resize_from_h}"
                             if render.seed_resize_from_w > 0 and render.seed_resize_from_h > 0
                             else None),
        "Clip skip": render.clip_skip if render.clip_skip > 1 else None,
        "ENSD": render.ensd or None,
        "Eta DDIM": number(render.eta) if render.eta is not None else None,
        "Version": f"sdbatch {__version__}",
    }
    return format_infotext(render.prompt, render.negative_prompt, params)


def recipe(render: Render, spec: StackSpec, calls: tuple[StageCall, ...]) -> dict[str, Any]:
    """Everything that made this image, as data."""
    return {
        "params": render.params(),
        "model": {"name": spec.name, "hash": spec.model_hash, "dtype": spec.dtype,
                  "vae": spec.vae_hash},
        "stages": [{"kind": c.kind, "key": c.key} for c in calls],
    }


def png_recipe(render: Render, spec: StackSpec, calls: tuple[StageCall, ...],
               job: dict[str, Any]) -> dict[str, Any]:
    """The PNG's `sdbatch` chunk: the recipe plus the seed-resolved job and the image's
    place in it, enough for `sdbatch reproduce` to render its batch again."""
    return {"sdbatch": __version__, "index": render.index, "recipe": recipe(render, spec, calls),
            "job": job}
