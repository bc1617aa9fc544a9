"""What is written about each image: its infotext, its recipe and its manifest entry."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdbatch import __version__
from sdbatch.matrix import Render
from sdbatch.models import names
from sdbatch.models.stack import StackSpec
from sdbatch.output.infotext import format_infotext, number
from sdbatch.plan import NO_MODEL, StageCall
from sdbatch.prompts.parser import extract_extra_networks

# The sampler names whose WebUI config says "uses_ensd" (modules/sd_samplers_kdiffusion.py,
# v1.10): only their infotext carries ENSD (with their default eta of 1; sdbatch takes an
# eta for DDIM only).
USES_ENSD = {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive"}


def network_name(name: str) -> str:
    """A network as the WebUI names it: its file's stem, whatever folder or path led to it
    (a path in a tag would not resolve in the WebUI, and a Windows drive's ':' breaks it)."""
    return names.stem(name.replace("\\", "/").rsplit("/", 1)[-1])


# a sampling step's keys that are the infotext's own when a chain starts from an init image
SAMPLING = ("prompt", "negative_prompt", "steps", "sampler", "schedule_type", "cfg_scale", "seed")


def _tag_names(prompt: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"lora": set(), "hypernet": set()}
    for tag in extract_extra_networks(prompt)[1]:
        if tag.network in found:
            found[tag.network].add(network_name(tag.name))
    return found


def network_tag(kind: str, name: str, weight: Any) -> str:
    """A network as the WebUI's tag writes it: <lora:name:w>, or <lora:name:te:unet> for
    a LoRA whose text encoder and UNet weights differ."""
    weights = weight if isinstance(weight, tuple | list) else (weight,)
    return f"<{kind}:{network_name(name)}:{':'.join(number(w) for w in weights)}>"


def infotext_prompt(render: Render) -> str:
    """The prompt as the WebUI must read it: the stack's LoRAs and hypernetworks that no tag
    names are appended as tags, with no separator (the WebUI appends its own "add network
    to prompt" setting the same way): the text left once the tags are removed, which is
    what gets encoded, stays the same."""
    tagged = _tag_names(render.prompt)
    extra = [network_tag(kind, name, weight)
             for kind, entries in (("lora", render.loras), ("hypernet", render.hypernetworks))
             for name, weight in entries if network_name(name) not in tagged[kind]]
    return render.prompt + "".join(extra)


def _hash_list(entries) -> str | None:
    """'name: hash, ...' with ':' and ',' taken out of names, as the WebUI writes them."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in entries) or None


def _embedding_hashes(render: Render, spec: StackSpec) -> list[tuple[str, str]]:
    """(trigger, TI hash) of each embedding the image triggers."""
    return [(n, spec.embedding_hashes[n]) for n in render.embeddings
            if n in spec.embedding_hashes]


def _networks(calls: tuple[StageCall, ...]) -> dict[str, Any]:
    """The networks of the image's last modelled call (an upscale loads none)."""
    return next((c.params for c in reversed(calls) if "loras" in c.params),
                {"loras": [], "hypernetworks": []})


def _upscaler(params: dict[str, Any], key: str = "upscaler") -> str:
    """An upscaler as the WebUI names it: a model file by the name the WebUI lists it under
    (R-ESRGAN 4x+ for RealESRGAN_x4plus.pth, the stem for others), a built-in as given."""
    return params.get(f"{key}_model", {}).get("name", params[key])


def upscaler_hashes(calls: tuple[StageCall, ...]) -> dict[str, str]:
    """Each upscaler model file the image's chain used -> its sha256."""
    return {m["name"]: m["sha256"] for c in calls for key in ("upscaler", "upscaler_2")
            if (m := c.params.get(f"{key}_model"))}


def post_params(render: Render, specs: Mapping[str, StackSpec], calls: tuple[StageCall, ...]
                ) -> dict[str, Any]:
    """The post-steps in the WebUI's infotext words, in the order it adds them: the first
    hires fix as its hires fix, an inpaint pass's mask settings, and "Denoising strength"
    (placed where create_infotext puts it): the hires fix's where there is one, since
    beside the Hires keys the WebUI reads it as the hires fix's, else the last pass's. The
    whole chain, every step and key, is in the sdbatch recipe."""
    out: dict[str, Any] = {}
    hires = next((c.params for c in calls if c.kind == "hires_fix"), None)
    if hires is not None:
        differs = {"Hires checkpoint": (hires["checkpoint"], render.checkpoint),
                   "Hires sampler": (hires["sampler"], render.sampler),
                   "Hires schedule type": (hires["schedule_type"], render.schedule_type),
                   "Hires CFG Scale": (number(hires["cfg_scale"]), number(render.cfg_scale)),
                   "Hires prompt": (hires["prompt"], render.prompt),
                   "Hires negative prompt": (hires["negative_prompt"], render.negative_prompt)}
        out |= {k: mine for k, (mine, base) in differs.items() if mine != base}
        if "Hires checkpoint" in out:  # its title, as the WebUI writes and finds it
            other = specs[hires["checkpoint"]]
            out["Hires checkpoint"] = f"{other.name} [{other.model_hash}]"
        if "Hires prompt" in out:  # the WebUI's hires pass takes the networks its prompt names
            out["Hires prompt"] = infotext_prompt(dataclasses.replace(render,
                                                                      prompt=hires["prompt"]))
        if hires["resize_x"] or hires["resize_y"]:
            out["Hires resize"] = f"{hires['resize_x']}x{hires['resize_y']}"
        else:
            out["Hires upscale"] = number(hires["scale"])
        if hires["steps"] != render.steps:
            out["Hires steps"] = hires["steps"]
        out["Hires upscaler"] = _upscaler(hires)
    paint = next((c.params for c in reversed(calls) if c.kind == "inpaint"), None)
    if paint is not None:
        if paint["invert_mask"]:
            out["Mask mode"] = "Inpaint not masked"
        if paint["mask_blur"] > 0:
            out["Mask blur"] = paint["mask_blur"]
        if paint["inpaint_area"] == "only_masked":
            out["Inpaint area"] = "Only masked"
            out["Masked area padding"] = paint["only_masked_padding"]
        out["Masked content"] = paint["masked_content"].replace("_", " ")
    tiled = next((c.params for c in reversed(calls) if c.kind == "sd_upscale"), None)
    if tiled is not None:
        out["SD upscale overlap"] = tiled["tile_overlap"]
        out["SD upscale upscaler"] = _upscaler(tiled)
    last = hires or next((c.params for c in reversed(calls) if "denoise" in c.params), None)
    if last is not None:
        out["Denoising strength"] = number(last["denoise"])
    extras = next((c.params for c in reversed(calls) if c.kind == "upscale"), None)
    if extras is not None:
        if extras["resize_x"] and extras["resize_y"]:
            out["Postprocess upscale to"] = f"{extras['resize_x']}x{extras['resize_y']}"
            out["Postprocess crop to"] = f"{extras['resize_x']}x{extras['resize_y']}"
        else:
            out["Postprocess upscale by"] = number(extras["scale"])
        out["Postprocess upscaler"] = _upscaler(extras)
        if extras["upscaler_2"] != "None" and extras["upscaler_2_visibility"] > 0:
            out["Postprocess upscaler 2"] = _upscaler(extras, "upscaler_2")
            out["Postprocess upscaler 2 visibility"] = number(extras["upscaler_2_visibility"])
    return out | _face_keys(calls)


def _face_keys(calls: tuple[StageCall, ...]) -> dict[str, Any]:
    """The Extras' face restorer keys, for each restorer that ran (visibility above 0), as
    its scripts write them; a face_restore step writes them too where they say more than
    its "Face restoration" does (the visibility below 1; CodeFormer's weight always). A
    later step's value wins."""
    out: dict[str, Any] = {}
    for c in calls:
        p = c.params
        if c.kind == "upscale":
            if p["gfpgan_visibility"] > 0:
                out["GFPGAN visibility"] = number(round(p["gfpgan_visibility"], 3))
            if p["codeformer_visibility"] > 0:
                out["CodeFormer visibility"] = number(round(p["codeformer_visibility"], 3))
                out["CodeFormer weight"] = number(round(p["codeformer_weight"], 3))
        elif c.kind == "face_restore" and p["visibility"] > 0:
            if p["visibility"] < 1:
                out[f"{p['architecture']} visibility"] = number(round(p["visibility"], 3))
            if p["architecture"] == "CodeFormer":
                out["CodeFormer weight"] = number(round(p["weight"], 3))
    return out


def face_restoration(calls: tuple[StageCall, ...]) -> str | None:
    """txt2img's "Face restoration": the last face_restore step's model, by the WebUI's
    name for its architecture (GFPGAN or CodeFormer)."""
    step = next((c.params for c in reversed(calls)
                 if c.kind == "face_restore" and c.params["visibility"] > 0), None)
    return None if step is None else step["architecture"]


CONTROL_MODE_WORDS = {"balanced": "Balanced", "my_prompt": "My prompt is more important",
                      "controlnet": "ControlNet is more important"}
RESIZE_MODE_WORDS = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                     "resize_and_fill": "Resize and Fill"}


def control_units(calls: tuple[StageCall, ...]) -> dict[str, str]:
    """``ControlNet N`` entries as sd-webui-controlnet writes them (its unit.serialize():
    Python's str of each value), for the units of the image's first stage that has some."""
    units = next((c.params["controlnet"] for c in calls if c.params.get("controlnet")), [])
    out = {}
    for n, u in enumerate(units):
        fields = {"Module": u["preprocessor"],
                  "Model": f"{names.stem(Path(u['model']).name)} [{u['short_hash']}]",
                  "Weight": float(u["weight"]),
                  "Resize Mode": RESIZE_MODE_WORDS[u["resize_mode"]],
                  "Processor Res": int(u["processor_res"]),
                  "Threshold A": float(u["low_threshold"]),
                  "Threshold B": float(u["high_threshold"]),
                  "Guidance Start": float(u["guidance_start"]),
                  "Guidance End": float(u["guidance_end"]),
                  "Pixel Perfect": bool(u["pixel_perfect"]),
                  "Control Mode": CONTROL_MODE_WORDS[u["control_mode"]]}
        out[f"ControlNet {n}"] = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return out


def control_maps(calls: tuple[StageCall, ...]) -> dict[str, list[str]]:
    """The manifest's ``controlnet``: the preprocessed control images the image used,
    relative to the run folder (none: no entry)."""
    found = dict.fromkeys(f"controlnet/{u['map']}.png" for c in calls
                          for u in c.params.get("controlnet", ()))
    return {"controlnet": list(found)} if found else {}


def infotext(render: Render, specs: Mapping[str, StackSpec], calls: tuple[StageCall, ...]
             ) -> str:
    """The WebUI's infotext, key by key in the order of its create_infotext
    (modules/processing.py, v1.10), extra generation parameters in the order the WebUI adds
    them during a render (Lora hashes when networks activate, TI hashes when the prompts
    are encoded, Eta DDIM when sampling starts). Hypernetworks are named only by their
    tags: the WebUI writes no Hypernet keys, and on paste it turns a "Hypernet" key into a
    second tag."""
    if all(c.kind in NO_MODEL for c in calls):  # Extras alone: no model made these pixels,
        keys = {"Face restoration": face_restoration(calls),  # so no sampling keys either
                **post_params(render, specs, calls), "Version": f"sdbatch {__version__}"}
        return format_infotext("", "", keys)
    if calls[0].kind != "txt2img" and len(calls) > 1 and "sampler" in calls[1].params:
        # from an init image, as the WebUI's img2img tab writes it: its first step's own
        render = dataclasses.replace(render, **{k: calls[1].params[k] for k in SAMPLING})
    spec = specs[render.checkpoint]
    stage = _networks(calls)
    prompt = infotext_prompt(render)
    lora_hash = {network_name(name): digest for name, _, digest in stage["loras"]}
    loras = {network_name(tag.name): lora_hash[network_name(tag.name)]
             for tag in extract_extra_networks(prompt)[1]
             if tag.network == "lora" and network_name(tag.name) in lora_hash}
    embeddings = _embedding_hashes(render, spec)
    # the first pass's size; a chain from an init image starts at its first step's size
    size = (render.width, render.height) if calls[0].kind == "txt2img" else \
        calls[1].params["output_size"]
    params = {
        "Steps": render.steps,
        "Sampler": render.sampler,
        "Schedule type": render.schedule_type,
        "CFG scale": number(render.cfg_scale),
        "Seed": render.seed,
        "Face restoration": face_restoration(calls),
        "Size": "x".join(map(str, size)),
        "Model hash": spec.model_hash,
        "Model": spec.name,
        "VAE hash": spec.vae_hash,
        "VAE": spec.vae.name if spec.vae else None,  # the WebUI: the file's basename
        "Variation seed": render.subseed if render.subseed_strength > 0 else None,
        "Variation seed strength": (number(render.subseed_strength)
                                    if render.subseed_strength > 0 else None),
        "Seed resize from": (f"{render.seed_resize_from_w}x{render.seed_resize_from_h}"
                             if render.seed_resize_from_w > 0 and render.seed_resize_from_h > 0
                             else None),
        "Denoising strength": None,
        "Clip skip": render.clip_skip if render.clip_skip > 1 else None,
        "ENSD": render.ensd if render.ensd and render.sampler in USES_ENSD else None,
        "RNG": "CPU",  # sdbatch draws all noise on the CPU; the WebUI's default is GPU
        "Tiling": {"false": None, "true": "True"}.get(render.tiling, render.tiling),
        **post_params(render, specs, calls),
        **control_units(calls),
        "Lora hashes": _hash_list(loras.items()),
        "TI hashes": _hash_list(embeddings),
        "Eta DDIM": (number(render.eta) if render.sampler == "DDIM" and render.eta
                     else None),
        # diffusers' beta sigmas take the WebUI's default alpha and beta, which it writes
        **({"Beta schedule alpha": 0.6, "Beta schedule beta": 0.6}
           if render.schedule_type == "Beta" else {}),
        "Version": f"sdbatch {__version__}",
    }
    return format_infotext(prompt, render.negative_prompt, params)


def recipe(render: Render, spec: StackSpec, calls: tuple[StageCall, ...],
           found: dict[str, dict[str, Any]] | None = None,
           device: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that made this image, as data; `device` says where (device, its name,
    torch's thread count: the worker's that drew it, by default this process's), which
    `sdbatch reproduce` needs to match bytes. ``found`` adds what a stage found to its
    record (a face restoration's ``faces``), by call key."""
    from sdbatch.models.stack import machine

    found = found or {}

    return {
        "params": render.params(),
        "model": {"name": spec.name, "hash": spec.model_hash, "dtype": spec.record["dtype"],
                  **({"switches": list(spec.switches)} if spec.switches else {}),
                  "vae": spec.vae_hash, "loras": _networks(calls)["loras"],
                  "hypernetworks": _networks(calls)["hypernetworks"],
                  "embeddings": dict(_embedding_hashes(render, spec))}
        | ({"upscalers": upscaler_hashes(calls)} if upscaler_hashes(calls) else {}),
        "device": device or machine(spec.torch_device),
        "stages": [{"kind": c.kind, "key": c.key, "input": c.input_key, "params": c.params,
                    **found.get(c.key, {})} for c in calls],
    }


def oom_retries(recipe: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Call key -> what running out of memory took when that stage of the image was made
    (its record's ``oom_retries``): what a render again needs to make the same passes."""
    return {stage["key"]: tuple(stage["oom_retries"]) for stage in recipe.get("stages", [])
            if "oom_retries" in stage}


def png_recipe(render: Render, spec: StackSpec, calls: tuple[StageCall, ...],
               job: dict[str, Any], found: dict[str, dict[str, Any]] | None = None,
               device: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PNG's `sdbatch` chunk: the recipe plus the seed-resolved job and the image's
    place in it, enough for `sdbatch reproduce` to render its batch again."""
    return {"sdbatch": __version__, "index": render.index,
            "recipe": recipe(render, spec, calls, found, device),
            "job": job}
