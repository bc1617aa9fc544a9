"""txt2img: noise from each image's own seed, denoised by the job's sampler.

The initial noise of every image is drawn on the CPU from its own seed (sdbatch.noise), and
a generator of the same seed feeds the sampler's later noise (ancestral samplers); SDE
samplers get a Brownian tree per image seed. So an image depends on its seed alone,
not on its batch, its device's RNG or how many workers ran the job.

SD1/SD2 and SDXL pipelines both run here; sdbatch encodes the prompts itself in either case.
SDXL adds a pooled embedding and size/crop conditioning (original = target = the image size,
crop at 0,0, as the WebUI's txt2img does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from sdbatch import noise, samplers
from sdbatch.matrix import Render
from sdbatch.models.embeddings import expand_triggers
from sdbatch.models.stack import Stack
from sdbatch.prompts.conditioning import CHUNK, encode_pair, match_chunks
from sdbatch.prompts.encode import encode_sdxl
from sdbatch.prompts.parser import extract_extra_networks, prompt_at_step

StepCallback = Callable[[int, int], None]  # (step done, steps)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def conditioning(pipe, first: Render, prompts: list[str], negatives: list[str],
                 device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """The pipeline's text (and for SDXL, pooled and size) conditioning for prompt texts
    already cleaned by clean_text."""
    if not is_sdxl(pipe):
        cond, uncond = encode_pair(pipe.tokenizer, pipe.text_encoder, prompts, negatives,
                                   first.clip_skip, device)
        return {"prompt_embeds": cond.to(dtype), "negative_prompt_embeds": uncond.to(dtype)}
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    cond, pooled = encode_sdxl(tokenizers, encoders, prompts, first.clip_skip, device)
    uncond, uncond_pooled = encode_sdxl(tokenizers, encoders, negatives, first.clip_skip, device)
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        # SDXL's empty negative is zeros (the WebUI and diffusers agree); decided per image,
        # not per batch as the WebUI does, so an image does not depend on its batch. An empty
        # prompt is one chunk: only that is zeroed, the batch's padding chunks stay as for
        # any other short prompt.
        empty = torch.tensor([n == "" for n in negatives], device=device)
        uncond = uncond.clone()
        uncond[:, :CHUNK + 2] = torch.where(empty[:, None, None], 0.0, uncond[:, :CHUNK + 2])
        uncond_pooled = torch.where(empty[:, None], torch.zeros_like(uncond_pooled),
                                    uncond_pooled)
    if cond.shape[1] != uncond.shape[1]:  # long prompts: pad with the empty prompt's chunks
        blank, _ = encode_sdxl(tokenizers, encoders, [""], first.clip_skip, device)
        cond, uncond = match_chunks(cond, uncond, blank)
    size = (first.height, first.width)
    return {"prompt_embeds": cond.to(dtype), "negative_prompt_embeds": uncond.to(dtype),
            "pooled_prompt_embeds": pooled.to(dtype),
            "negative_pooled_prompt_embeds": uncond_pooled.to(dtype),
            "original_size": size, "target_size": size, "crops_coords_top_left": (0, 0)}


def clean_text(pipe, text: str) -> str:
    """The text to encode: <lora:...> tags removed (they are applied to the model, as in the
    WebUI), multi-vector embedding triggers spelled out for the tokenizer."""
    return expand_triggers(pipe.tokenizer, extract_extra_networks(text)[0])


def _pad(x: torch.Tensor, length: int, blank: torch.Tensor) -> torch.Tensor:
    extra = (length - x.shape[1]) // blank.shape[1]
    return torch.cat([x, blank.to(x.dtype).repeat(x.shape[0], extra, 1)], dim=1) if extra else x


class Timeline:
    """One image's conditioning at every sampling step: the WebUI's prompt editing
    ([from:to:when]) and alternation ([a|b]) switch the text as sampling goes.

    Every distinct (prompt, negative) pair is encoded once, and all are padded with blank
    chunks to one token length, so the switch never changes the tensors' shapes.
    """

    def __init__(self, pipe, render: Render, device: torch.device, dtype: torch.dtype):
        prompt, negative = (clean_text(pipe, render.prompt),
                            clean_text(pipe, render.negative_prompt))
        self.keys = [(prompt_at_step(prompt, s, render.steps),
                      prompt_at_step(negative, s, render.steps)) for s in range(render.steps)]
        encoded = {key: conditioning(pipe, render, [key[0]], [key[1]], device, dtype)
                   for key in dict.fromkeys(self.keys)}
        self.length = max(c["prompt_embeds"].shape[1] for c in encoded.values())
        if len(encoded) > 1:
            blank = conditioning(pipe, render, [""], [""], device, dtype)["prompt_embeds"]
            for c in encoded.values():
                for name in ("prompt_embeds", "negative_prompt_embeds"):
                    c[name] = _pad(c[name], self.length, blank[:, :CHUNK + 2])
        self.encoded = encoded

    def key(self, step: int) -> tuple[str, str]:
        return self.keys[min(step, len(self.keys) - 1)]

    def at(self, step: int) -> dict[str, object]:
        return self.encoded[self.key(step)]


def _same_length_groups(timelines: list[Timeline]) -> list[list[int]]:
    """Image positions grouped by their conditioning's token length, in order.

    Each image is encoded alone (cond and negative padded only to each other), so an image
    never takes padding from a longer prompt beside it; images of one length share a pass.
    """
    groups: dict[int, list[int]] = {}
    for i, timeline in enumerate(timelines):
        groups.setdefault(timeline.length, []).append(i)
    return list(groups.values())


def _stack_conds(conds: list[dict[str, object]]) -> dict[str, object]:
    return {k: torch.cat([c[k] for c in conds]) if isinstance(v, torch.Tensor) else v
            for k, v in conds[0].items()}


def _switchable(pipe) -> list[str]:
    return ["latents", "prompt_embeds"] + (["add_text_embeds"] if is_sdxl(pipe) else [])


def _switched(pipe, conds: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    """The pipeline's own loop tensors for new conditioning: [negative, prompt] under CFG."""
    c = _stack_conds(conds)
    cfg = pipe.do_classifier_free_guidance

    def pair(neg: str, pos: str) -> torch.Tensor:
        return torch.cat([c[neg], c[pos]]) if cfg else c[pos]

    out = {"prompt_embeds": pair("negative_prompt_embeds", "prompt_embeds")}
    if is_sdxl(pipe):
        out["add_text_embeds"] = pair("negative_pooled_prompt_embeds", "pooled_prompt_embeds")
    return out


def run(stack: Stack, renders: tuple[Render, ...], on_step: StepCallback | None = None
        ) -> list[Image.Image]:
    first = renders[0]
    pipe = stack.pipe
    channels = pipe.vae.config.latent_channels
    if pipe.unet.config.in_channels != channels:
        raise ValueError(f"txt2img needs a {channels}-channel model; this one takes "
                         f"{pipe.unet.config.in_channels} input channels (an inpainting model)")
    timelines = [Timeline(pipe, r, stack.device, stack.dtype) for r in renders]
    shape = (channels, first.height // 8, first.width // 8)
    images: list[Image.Image | None] = [None] * len(renders)

    for group in _same_length_groups(timelines):
        members = [renders[i] for i in group]
        mine = [timelines[i] for i in group]

        def step_end(pipe_, i, _t, kwargs, mine=mine):
            if on_step:
                on_step(i + 1, first.steps)
            if any(t.key(i + 1) != t.key(i) for t in mine):
                kwargs.update(_switched(pipe_, [t.at(i + 1) for t in mine]))
            return kwargs

        pipe.scheduler = samplers.make_scheduler(stack.scheduler_config, first.sampler,
                                                 first.schedule_type)
        if hasattr(pipe.scheduler, "noise_sampler_seed"):
            pipe.scheduler.noise_sampler_seed = [r.seed for r in members]
        latents = torch.stack([
            noise.initial_noise(shape, r.seed, r.subseed, r.subseed_strength,
                                (r.seed_resize_from_w, r.seed_resize_from_h)) for r in members
        ]).to(stack.device, stack.dtype)
        out = pipe(
            **_stack_conds([t.at(0) for t in mine]), latents=latents,
            generator=[noise.sampler_generator(r.seed, r.ensd, shape) for r in members],
            num_inference_steps=first.steps, guidance_scale=first.cfg_scale,
            width=first.width, height=first.height, output_type="pil",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=_switchable(pipe),
            **({"eta": first.eta} if first.eta is not None else {}),
        )
        for i, image in zip(group, out.images, strict=True):
            images[i] = image
    return images
