"""What is written about each image: its infotext, its recipe and its manifest entry."""

from __future__ import annotations

import re
from typing import Any

from sdbatch import __version__
from sdbatch.matrix import Render
from sdbatch.models import names
from sdbatch.models.stack import StackSpec
from sdbatch.output.infotext import format_infotext, number
from sdbatch.plan import StageCall


def _used_embeddings(render: Render, spec: StackSpec) -> dict[str, str]:
    """Embeddings whose trigger word appears in the prompt or negative prompt -> TI hash."""
    from sdbatch.models.embeddings import ti_hash

    text = f"{render.prompt}\n{render.negative_prompt}"
    return {path.stem: ti_hash(path) for path in spec.embeddings
            if re.search(rf"(?<![\w]){re.escape(path.stem)}(?![\w])", text, re.IGNORECASE)}


def infotext(render: Render, spec: StackSpec, calls: tuple[StageCall, ...]) -> str:
    stage = calls[0].params
    loras = {name: digest for name, _, digest in stage["loras"]}
    hypernets = stage["hypernetworks"]
    embeddings = _used_embeddings(render, spec)
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
        "Hypernet": ", ".join(name for name, _, _ in hypernets) or None,
        "Hypernet hash": ", ".join(digest for _, _, digest in hypernets) or None,
        "Hypernet strength": ", ".join(number(w) for _, w, _ in hypernets) or None,
        "Lora hashes": ", ".join(f"{n}: {h}" for n, h in loras.items()) or None,
        "TI hashes": ", ".join(f"{n}: {h}" for n, h in embeddings.items()) or None,
        "Version": f"sdbatch {__version__}",
    }
    return format_infotext(render.prompt, render.negative_prompt, params)


def recipe(render: Render, spec: StackSpec, calls: tuple[StageCall, ...]) -> dict[str, Any]:
    """Everything that made this image, as data; `device` says where (device, its name,
    torch's thread count), which `sdbatch reproduce` needs to match bytes."""
    from sdbatch.models.stack import machine

    return {
        "params": render.params(),
        "model": {"name": spec.name, "hash": spec.model_hash, "dtype": spec.record["dtype"],
                  "vae": spec.vae_hash},
        "device": machine(spec.torch_device),
        "stages": [{"kind": c.kind, "key": c.key} for c in calls],
    }


def png_recipe(render: Render, spec: StackSpec, calls: tuple[StageCall, ...],
               job: dict[str, Any]) -> dict[str, Any]:
    """The PNG's `sdbatch` chunk: the recipe plus the seed-resolved job and the image's
    place in it, enough for `sdbatch reproduce` to render its batch again."""
    return {"sdbatch": __version__, "index": render.index, "recipe": recipe(render, spec, calls),
            "job": job}
