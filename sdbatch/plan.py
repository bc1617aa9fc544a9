"""Renders -> a graph of keyed stage calls -> batches of forward passes.

Each image is a chain of stage calls: txt2img (or its init image), then its post-steps in
order. A call's content key hashes its kind, its parameters, its input's key and the model
stack's identity, so equal work has an equal key: calls with one key are computed once per
run (one base image under three hires variants is drawn once), a resumed run recognises
what is done, and an intermediate saved under its key is found again.

Calls of one kind that differ only in seed, prompt, negative prompt or CFG scale (and in
their input) share forward passes of up to max_batch (executor.max_batch): small latents
are bound by streaming the weights, so a pass of 8 costs little more than a pass of 1.
params.batch_size keeps its WebUI meaning (images per cell, seeds counting up) and does not
size the passes. The grouping depends on the job and max_batch alone, never on free memory
or how many workers run it, so bytes reproduce (a pass's composition moves pixels by a
rounding level, so run.json records max_batch). Batches are ordered so that every call comes
after its input and each image is finished as early as the graph allows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdbatch import preprocessor_names
from sdbatch.images import hires_size
from sdbatch.matrix import Render
from sdbatch.upscalers import scaled_size

if TYPE_CHECKING:
    from sdbatch.models.image_models import ImageModelFile

# what may differ inside one forward pass: it changes the noise, the text or the guidance
# scale of an image, not the pass
PER_IMAGE = ("seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
             "ensd", "prompt", "negative_prompt", "cfg_scale", "mask_sha256", "mask", "path",
             "sha256")
# what a post-step call takes over from its image (it changes the noise or the model)
INHERITED = ("subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
             "ensd", "eta", "clip_skip", "tiling", "loras", "hypernetworks")
NO_MODEL = ("image", "upscale", "face_restore")  # stage kinds that load no model stack
# the Extras upscale's face restorers: WebUI name, the key that turns it on
EXTRAS_RESTORERS = (("GFPGAN", "gfpgan_visibility"), ("CodeFormer", "codeformer_visibility"))


SHARE_PREFIXES = True  # benchmarks/hires_sharing.py turns it off to measure what sharing saves


def content_key(kind: str, params: dict[str, Any], input_key: str | None, stack: str) -> str:
    blob = json.dumps([kind, params, input_key, stack], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StageCall:
    kind: str
    params: dict[str, Any]
    input_key: str | None
    stack: str

    @property
    def key(self) -> str:
        return content_key(self.kind, self.params, self.input_key, self.stack)

    def group(self) -> str:
        """Calls with the same group can share a forward pass."""
        shared = {k: v for k, v in self.params.items() if k not in PER_IMAGE}
        return content_key(self.kind, shared, None, self.stack)


@dataclass(frozen=True)
class Batch:
    """Calls of one kind run together; ``renders[i]`` is the first image that needs
    ``calls[i]`` (its noise settings, networks and stack)."""

    kind: str
    renders: tuple[Render, ...]
    calls: tuple[StageCall, ...] = ()
    depth: int = 0


@dataclass(frozen=True)
class InputImage:
    """An image file the job reads (init image, mask), known before any work."""

    sha256: str
    size: tuple[int, int]


@dataclass(frozen=True)
class Plan:
    chains: dict[int, tuple[StageCall, ...]]
    batches: tuple[Batch, ...]

    def key(self, index: int) -> str:
        """The content key of an image: the key of its last stage call."""
        return self.chains[index][-1].key


def _networks(render: Render, networks: dict[tuple[str, str], str]) -> dict[str, Any]:
    params = {}
    for kind, field in (("lora", "loras"), ("hypernet", "hypernetworks")):
        params[field] = [[name, weight, networks.get((kind, name), "")]
                         for name, weight in getattr(render, field)]
    return params


UPSCALER_KEYS = ("upscaler", "upscaler_2")


def control_units(units: list[dict[str, Any]], size: tuple[int, int],
                  inputs: dict[str, InputImage], controlnets: dict[str, tuple[str, str]]
                  ) -> list[dict[str, Any]]:
    """A stage's ControlNet units as it runs them: the model's hashes, the image's sha256,
    the thresholds and processor resolution in effect (pixel perfect: from the image's and
    the stage's size), and ``map``, the content key of the preprocessed control image."""
    out = []
    for unit in units:
        u = dict(unit)
        image = inputs[u["image"]]
        u["sha256"] = image.sha256
        u["model_hash"], u["short_hash"] = controlnets.get(u["model"], ("", ""))
        u["low_threshold"], u["high_threshold"] = preprocessor_names.thresholds(
            u["preprocessor"], u["low_threshold"], u["high_threshold"])
        if u["pixel_perfect"]:
            u["processor_res"] = preprocessor_names.pixel_perfect_resolution(
                *image.size, *size, u["resize_mode"])
        made_of = [u[k] for k in ("sha256", "preprocessor", "processor_res", "low_threshold",
                                  "high_threshold")]
        u["map"] = content_key("control_map", {"of": made_of}, None, "")
        out.append(u)
    return out


def chain(render: Render, stacks: dict[str, str], networks: dict[tuple[str, str], str],
          inputs: dict[str, InputImage] | None = None,
          upscalers: dict[str, dict[str, Any]] | None = None,
          image_models: dict[str, ImageModelFile] | None = None,
          controlnets: dict[str, tuple[str, str]] | None = None,
          vae_tile_px: int | None = None) -> tuple[StageCall, ...]:
    """The image's stage calls, each keyed on its input's key. ``upscalers`` maps each
    upscaler model name of the job to its record (the WebUI's name, the file's sha256, the
    tiles it runs in), which goes into the params as ``upscaler_model``; ``image_models``
    each face restorer's name to its file; ``controlnets`` each ControlNet name to its
    (AutoV2, old short) hashes: keys follow the files. ``vae_tile_px`` (executor's) goes
    into the params of each call whose VAE may work in tiles (see vae_tiled)."""
    inputs, upscalers, image_models = inputs or {}, upscalers or {}, image_models or {}
    base = render.params() | _networks(render, networks)
    job_units = base.get("controlnet")
    if "controlnet" in base:
        base["controlnet"] = control_units(base["controlnet"], (render.width, render.height),
                                           inputs, controlnets or {})
    kinds = [step.kind for step in render.post] + [None]  # each call's next step's kind
    if render.init_image is None:
        size = (render.width, render.height)
        first = StageCall("txt2img", base | vae_tiled(size, size, vae_tile_px)
                          | recolors(base, kinds[0]), None, stacks[render.checkpoint])
    else:
        image = inputs[render.init_image]
        first = StageCall("image", {"path": render.init_image, "sha256": image.sha256}, None, "")
        size = image.size
    calls = [first]
    for n, step in enumerate(render.post):
        modelled = step.kind not in NO_MODEL
        params = step.params() | ({k: base[k] for k in INHERITED} if modelled else {})
        params["input_size"] = list(size)
        size = output_size(step.kind, params, size)
        params["output_size"] = list(size)
        if "controlnet" in params:
            # the extension's hires pass takes the first pass's maps (pixel perfect from the
            # first pass's size), fitted to its own size; other steps are runs of their own
            first_pass = (n == 0 and step.kind == "hires_fix" and render.init_image is None
                          and params["controlnet"] == job_units)
            params["controlnet"] = control_units(
                params["controlnet"], (render.width, render.height) if first_pass else size,
                inputs, controlnets or {})
        if step.kind == "inpaint":
            params["mask_sha256"] = inputs[params["mask"]].sha256
        for key in UPSCALER_KEYS:
            if params.get(key) in upscalers:
                params[f"{key}_model"] = upscalers[params[key]]
        if step.kind == "face_restore":
            file = image_models[params["model"]]
            params |= {"model_sha256": file.sha256, "architecture": file.architecture}
        if step.kind == "upscale":
            params |= {f"{name.lower()}_sha256": image_models[name].sha256
                       for name, key in EXTRAS_RESTORERS if params[key] > 0}
        if modelled:
            params |= vae_tiled(params["input_size"], size, vae_tile_px)
            if step.kind != "inpaint":  # the WebUI recolors before pasting the unmasked
                params |= recolors(params, kinds[n + 1])  # part back: see README
        checkpoint = params.get("checkpoint") or render.checkpoint
        calls.append(StageCall(step.kind, params, calls[-1].key,
                               stacks[checkpoint] if modelled else ""))
    return tuple(calls)


def recolors(params: dict[str, Any], next_kind: str | None) -> dict[str, Any]:
    """``{"recolor": True}`` for a call whose pictures get the recolor units' post-processing
    (control.recolored): the extension runs it on each finished generation, so after a
    hires fix, not on the first pass it continues."""
    units = params.get("controlnet", ())
    if next_kind == "hires_fix" or not any(u["preprocessor"] in preprocessor_names.RECOLOR
                                           for u in units):
        return {}
    return {"recolor": True}


def vae_tiled(input_size: Sequence[int], output_size: Sequence[int],
              vae_tile_px: int | None) -> dict[str, int]:
    """``{"vae_tile_px": px}`` when a call's picture, in or out, has a side over px: its VAE
    may then encode or decode in tiles, whose seams make other pixels than a whole pass (or
    tiles of another size), so its key and recipe follow the setting; smaller pictures do
    not depend on it. (A tile or crop of the picture may be smaller: the key is then
    stricter than it must be, never looser.)"""
    if vae_tile_px is None or max(*input_size, *output_size) <= vae_tile_px:
        return {}
    return {"vae_tile_px": vae_tile_px}


def output_size(kind: str, params: dict[str, Any], size: tuple[int, int]) -> tuple[int, int]:
    """The size of a post-step's picture, known from the job alone."""
    if kind == "hires_fix":
        return hires_size(*size, params["scale"], params["resize_x"], params["resize_y"]).final
    if kind == "sd_upscale":
        return scaled_size(*size, params["scale"])
    if kind == "face_restore" or (kind == "inpaint"
                                   and params["inpaint_area"] == "only_masked"):
        return size  # only masked pastes the repaint back into the picture as it came
    if kind == "upscale":
        if params["resize_x"] and params["resize_y"]:
            return params["resize_x"], params["resize_y"]
        return scaled_size(*size, params["scale"])
    return (params["width"] or size[0], params["height"] or size[1])


def make_plan(renders: list[Render], stacks: dict[str, str], max_batch: int,
              networks: dict[tuple[str, str], str] | None = None,
              inputs: dict[str, InputImage] | None = None,
              upscalers: dict[str, dict[str, Any]] | None = None,
              image_models: dict[str, ImageModelFile] | None = None,
              controlnets: dict[str, tuple[str, str]] | None = None,
              vae_tile_px: int | None = None) -> Plan:
    """``stacks`` maps each checkpoint name of the job to its stack identity, ``networks``
    each (kind, name) of a LoRA or hypernetwork to its file hash, ``inputs`` each input
    image path to its hash and size, ``upscalers`` each upscaler model name to its record
    (see chain), ``image_models`` each face restorer's name to its file, ``controlnets``
    each ControlNet name to its (AutoV2, old short) hashes: keys follow the files, and
    ``vae_tile_px`` the VAE's tiles (see vae_tiled). Calls that may share a pass go up to
    ``max_batch`` to one, in image order."""
    chains = {r.index: chain(r, stacks, networks or {}, inputs, upscalers, image_models,
                             controlnets, vae_tile_px)
              for r in renders}
    if not SHARE_PREFIXES:  # every image computes its own chain
        chains = {i: _unshared(c, i) for i, c in chains.items()}
    first_user: dict[str, tuple[StageCall, Render, int]] = {}
    for r in renders:
        for depth, call in enumerate(chains[r.index]):
            first_user.setdefault(call.key, (call, r, depth))
    groups: dict[str, list[tuple[StageCall, Render, int]]] = {}
    for call, r, depth in first_user.values():
        groups.setdefault(call.group() + str(depth), []).append((call, r, depth))
    batches = []
    for members in groups.values():
        # a picture read shares no pass: alone, a bad file fails its own images only
        limit = 1 if members[0][0].kind == "image" else max_batch
        for start, end in pass_bounds(len(members), limit):
            part = members[start:end]
            batches.append(Batch(part[0][0].kind, tuple(r for _, r, _ in part),
                                 tuple(c for c, _, _ in part), part[0][2]))
    return Plan(chains, schedule(batches))


def pass_bounds(n: int, max_batch: int) -> list[tuple[int, int]]:
    """``n`` calls in as few passes as max_batch allows, of sizes that differ by one at most
    (12 at 8: 6 + 6, not 8 + 4): two workers get equal halves, one pays the same."""
    passes = -(-n // max_batch)
    size, extra = divmod(n, passes) if n else (0, 0)
    bounds, start = [], 0
    for i in range(passes):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _unshared(calls: tuple[StageCall, ...], index: int) -> tuple[StageCall, ...]:
    out: list[StageCall] = []
    for call in calls:
        out.append(StageCall(call.kind, {**call.params, "unshared": index},
                             out[-1].key if out else None, call.stack))
    return tuple(out)


def schedule(batches: list[Batch]) -> tuple[Batch, ...]:
    """Batches in the order of the first image each serves (then depth), each moved after
    the batches that make its inputs: images are finished early and inputs come first."""
    waiting = sorted(batches, key=lambda b: (b.renders[0].index, b.depth))
    made: set[str | None] = {None}
    out: list[Batch] = []
    while waiting:
        i = next(i for i, b in enumerate(waiting) if all(c.input_key in made for c in b.calls))
        batch = waiting.pop(i)
        made.update(c.key for c in batch.calls)
        out.append(batch)
    return tuple(out)


def size_problems(plan: Plan, inputs: dict[str, InputImage]) -> list[tuple[str, str]]:
    """(key, message) for each post-step whose size cannot work: a picture size that is
    not a multiple of 8 (the VAE's cell), a mask of another aspect than its picture, or SD
    upscale tiles that do not fit their picture or their overlap."""
    found: dict[str, str] = {}
    for chain in plan.chains.values():
        for depth, call in enumerate(chain[1:]):
            where = f"post[{depth}].{call.kind}"
            w, h = call.params["output_size"]
            if (w % 8 or h % 8) and where not in found:
                iw, ih = call.params["input_size"]
                fix = ("a scale or resize_x / resize_y that gives multiples of 8"
                       if call.kind in ("hires_fix", "upscale")
                       else "width and height, multiples of 8")
                found[where] = (f"makes a {w}x{h} picture from a {iw}x{ih} one; sizes must "
                                f"be multiples of 8: give {fix}")
            if call.kind == "sd_upscale" and where not in found:
                tw, th, ov = call.params["width"], call.params["height"], \
                    call.params["tile_overlap"]
                if tw > w or th > h:
                    found[where] = (f"its {tw}x{th} tiles are larger than the {w}x{h} picture "
                                    f"they cut: give width and height at most {w}x{h}")
                elif ov >= min(tw, th):
                    found[where] = (f"tile_overlap {ov} must be less than the {tw}x{th} tile: "
                                    "give a smaller tile_overlap or larger tiles")
            if call.kind == "inpaint":
                mw, mh = inputs[call.params["mask"]].size
                iw, ih = call.params["input_size"]
                if abs(mw / mh - iw / ih) > 0.01 and f"{where}.mask" not in found:
                    found[f"{where}.mask"] = (f"{call.params['mask']} is {mw}x{mh}, the picture "
                                              f"it masks is {iw}x{ih}: a mask must have its "
                                              "picture's aspect ratio (it is resized to fit)")
    return list(found.items())


def finals(plan: Plan) -> dict[str, list[int]]:
    """Each final call's key -> the images it finishes (equal chains finish several)."""
    out: dict[str, list[int]] = {}
    for index, chain in plan.chains.items():
        out.setdefault(chain[-1].key, []).append(index)
    return out


def needed(plan: Plan, done: set[int], kept: Callable[[str], bool]) -> list[Batch]:
    """The batches a run still has to compute: those making a call that an unfinished image
    needs, walking each chain back from its end until an output is already kept."""
    want: set[str] = set()
    for index, chain in plan.chains.items():
        if index in done:
            continue
        for depth in range(len(chain) - 1, -1, -1):
            call = chain[depth]
            if depth < len(chain) - 1 and kept(call.key):
                break
            want.add(call.key)
    return [b for b in plan.batches if any(c.key in want for c in b.calls)]
