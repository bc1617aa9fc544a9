"""txt2img: noise from each image's own seed, denoised by the job's sampler in sdbatch's own
loop (sdbatch.sampling), decoded by the VAE as the diffusers pipelines do.

The initial noise of every image is drawn on the CPU from its own seed (sdbatch.noise), and
a generator of the same seed feeds the sampler's later noise (ancestral samplers); the SDE
samplers (DPM++ SDE, 2M SDE, 3M SDE) get a Brownian tree per image seed. So an image depends
on its seed alone, not on its batch, its device's RNG or how many workers ran the job.

SD1/SD2 and SDXL pipelines both run here; sdbatch encodes the prompts itself in either case.
SDXL adds a pooled embedding and size/crop conditioning (original = target = the image size,
crop at 0,0, as the WebUI's txt2img does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdbatch import control as controlnet
from sdbatch import noise, samplers, sampling
from sdbatch.matrix import Render
from sdbatch.models.embeddings import expand_triggers
from sdbatch.models.stack import Stack
from sdbatch.prompts.conditioning import encode_prompts
from sdbatch.prompts.encode import encode_sdxl
from sdbatch.prompts.parser import (
    extract_extra_networks,
    prompt_at_step,
    schedules,
    split_and,
)
from sdbatch.sampling import Conditioning
from sdbatch.stages.picture import Picture
from sdbatch.stages.vae import decode, full_mask_conditioning, is_sdxl

StepCallback = Callable[[int, int], None]  # (step done, steps)


def is_open_clip(pipe) -> bool:
    """SD2's text encoder (OpenCLIP ViT-H, 1024 wide), whose penultimate layer it was trained
    on and its config ends at; the WebUI applies no clip skip to it."""
    return pipe.text_encoder.config.hidden_size == 1024


def encode_text(pipe, text: str, clip_skip: int, device: torch.device, dtype: torch.dtype,
                *, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text cleaned by clean_text -> ((1, 77 * chunks, dim), SDXL's pooled (1, dim) or None)."""
    return encode_texts(pipe, [text], clip_skip, device, dtype, negative=negative)[0]


def encode_texts(pipe, texts: list[str], clip_skip: int, device: torch.device,
                 dtype: torch.dtype, *, negative: bool = False
                 ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The texts of one prompt's schedule (its [a:b:when] and [a|b] texts), encoded as the
    WebUI's get_learned_conditioning encodes them: as one batch, the shorter padded with
    empty chunks and the emphasis mean kept over the whole batch. One image's texts only:
    an image never depends on the others of its pass.

    SDXL's negative is zeros where all its texts are empty (the WebUI's force_zero); only
    the empty prompt's own chunk: padding chunks added later stay as for any short prompt.
    """
    if not is_sdxl(pipe):
        skip = 1 if is_open_clip(pipe) else clip_skip
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, skip, device)
        return [(row[None].to(dtype), None) for row in embeds]
    embeds, pooled = encode_sdxl((pipe.tokenizer, pipe.tokenizer_2),
                                 (pipe.text_encoder, pipe.text_encoder_2), texts, device)
    if negative and not any(texts) and pipe.config.get("force_zeros_for_empty_prompt", False):
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return [(e[None].to(dtype), p[None].to(dtype)) for e, p in zip(embeds, pooled, strict=True)]


Encoded = tuple[torch.Tensor, torch.Tensor | None]


def clean_text(pipe, text: str) -> str:
    """The text to encode: <lora:...> tags removed (they are applied to the model, as in the
    WebUI), multi-vector embedding triggers spelled out for the tokenizer."""
    return expand_triggers(pipe.tokenizer, extract_extra_networks(text)[0])


def _pad_last(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad by repeating the last token vector: how the WebUI evens out AND parts of
    different lengths (reconstruct_multicond_batch)."""
    extra = length - x.shape[1]
    return torch.cat([x, x[:, -1:].repeat(1, extra, 1)], dim=1) if extra else x


class Timeline:
    """One image's conditioning at every model call: the WebUI's composable prompts (AND),
    prompt editing ([from:to:when]) and alternation ([a|b]).

    The WebUI's schedules run over steps x calls per step (2 for second-order samplers) and
    follow the model-call count; so does this. Every distinct text is encoded once; the
    parts of a prompt are evened out as the WebUI does, and everything is padded with blank
    chunks to one token length, so a switch never changes the tensors' shapes.
    """

    def __init__(self, pipe, render: Render, calls_per_step: int, device: torch.device,
                 dtype: torch.dtype, first_pass: int | None = None):
        """``first_pass``: a hires pass's first pass, in model calls: the WebUI's hires
        timeline goes on from it (integers count on from it, fractions from 1.0)."""
        prompt = clean_text(pipe, render.prompt)
        # the WebUI takes <lora:...> tags out of prompts only: a negative's are words
        negative = expand_triggers(pipe.tokenizer, render.negative_prompt)
        parts = split_and(prompt)
        self.weights = tuple(w for _, w in parts)
        total = render.steps * calls_per_step
        base, hires = (total, None) if first_pass is None else (first_pass, total)

        def at(text: str, call: int) -> str:
            return prompt_at_step(text, call, base, hires_steps=hires)
        self.keys = [(tuple(at(p, c) for p, _ in parts), at(negative, c))
                     for c in range(total)]

        def schedule(text: str, negative: bool) -> dict[str, Encoded]:
            """The text's timeline as the WebUI encodes it: one batch, repeats and all
            ([a|b] lists a text per step), which its emphasis mean counts."""
            texts = [t for _, t in schedules(text, base, hires_steps=hires)]
            return dict(zip(texts, encode_texts(pipe, texts, render.clip_skip, device, dtype,
                                                negative=negative), strict=True))

        parts_of = [schedule(p, False) for p, _ in parts]
        negative_of = schedule(negative, True)
        encoded = {}
        for key in dict.fromkeys(self.keys):
            conds = [parts_of[i][p] for i, p in enumerate(key[0])]
            longest = max(c[0].shape[1] for c in conds)
            embeds = torch.cat([_pad_last(c[0], longest) for c in conds])
            pooled = None if conds[0][1] is None else torch.cat([c[1] for c in conds])
            encoded[key] = ((embeds, pooled), negative_of[key[1]])
        # (negative, prompt) token lengths, each the same at every call (a schedule's texts
        # are encoded as one batch, so they share their chunk count, and AND parts are
        # evened out above): where they differ, the two take separate passes, as in the
        # WebUI (its pad_cond_uncond is off by default)
        self.lengths = (max(u[0].shape[1] for _, u in encoded.values()),
                        max(c[0].shape[1] for c, _ in encoded.values()))
        self.encoded = encoded

    def key(self, call: int) -> tuple[tuple[str, ...], str]:
        return self.keys[min(call, len(self.keys) - 1)]

    def at(self, call: int) -> tuple[Encoded, Encoded]:
        """((parts' embeddings, pooled), (negative's embeddings, pooled)) at model call `call`."""
        return self.encoded[self.key(call)]


def _same_length_groups(timelines: list[Timeline]) -> list[list[int]]:
    """Image positions grouped by their negative's and prompt's token lengths, in order.

    Each image is encoded alone, so an image never takes padding from a longer prompt
    beside it; images of the same lengths share a pass.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, timeline in enumerate(timelines):
        groups.setdefault(timeline.lengths, []).append(i)
    return list(groups.values())


def batch_conditioning(timelines: list[Timeline], call: int,
                       time_ids: torch.Tensor | None) -> Conditioning:
    """The batch's UNet inputs at one model call: negatives first, then every image's parts."""
    encoded = [t.at(call) for t in timelines]
    rows, parts = len(timelines), []
    for timeline in timelines:
        parts.append(tuple((rows + j, w) for j, w in enumerate(timeline.weights)))
        rows += len(timeline.weights)
    negative, prompt = timelines[0].lengths  # one group: the same for every image
    longest = max(negative, prompt)
    context = torch.cat([_pad_zeros(u[0], longest) for _, u in encoded]
                        + [_pad_zeros(c[0], longest) for c, _ in encoded])
    pooled = None
    if time_ids is not None:
        pooled = torch.cat([u[1] for _, u in encoded] + [c[1] for c, _ in encoded])
        time_ids = time_ids.repeat(rows, 1)
    return Conditioning(context, tuple(parts), pooled, time_ids,
                        None if negative == prompt else (negative, prompt))


def _pad_zeros(x: torch.Tensor, length: int) -> torch.Tensor:
    """Stacking room only: each pass reads its own rows' length (Conditioning.lengths)."""
    extra = length - x.shape[1]
    return torch.cat([x, x.new_zeros(x.shape[0], extra, x.shape[2])], dim=1) if extra else x


def _time_ids(pipe, width: int, height: int, dtype: torch.dtype, device: torch.device
              ) -> torch.Tensor | None:
    """SDXL's size conditioning: original = target = the given size, crop at 0,0, as the
    WebUI conditions its passes."""
    if not is_sdxl(pipe):
        return None
    size = (height, width)
    return torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=device)


def _guidance_embedding(pipe, cfg_scales: list[float], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor | None:
    """Guidance-distilled UNets (LCM) take each image's CFG scale as an embedding instead
    of an unconditional pass, as the diffusers pipelines give it."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    scale = torch.tensor([cfg - 1 for cfg in cfg_scales], dtype=torch.float32)
    return pipe.get_guidance_scale_embedding(scale, embedding_dim=dim).to(device, dtype)


def pictures(pipe, latents: torch.Tensor) -> list[Picture]:
    """Decoded pictures, each with its latents kept for a later latent-space step."""
    return [Picture(image, lat.detach().float().cpu())
            for image, lat in zip(decode(pipe, latents), latents, strict=True)]


def run(stack: Stack, renders: tuple[Render, ...], on_step: StepCallback | None = None,
        control: list[controlnet.Unit] | None = None) -> list[Picture]:
    """``control``: the batch's ControlNet units (every image of it has the same)."""
    first = renders[0]
    units = control or []
    pipe = stack.pipe
    channels = pipe.vae.config.latent_channels
    per_step = sampling.calls_per_step(
        samplers.make_scheduler(stack.scheduler_config, first.sampler, first.schedule_type))
    timelines = [Timeline(pipe, r, per_step, stack.device, stack.dtype) for r in renders]
    if pipe.unet.config.time_cond_proj_dim is not None and any(
            len(t.weights) > 1 for t in timelines):
        raise ValueError("this model is guidance-distilled (no negative pass), so it cannot "
                         "compose prompts with AND; remove the AND")
    shape = (channels, first.height // 8, first.width // 8)
    everything = full_mask_conditioning(pipe, len(renders), shape[1:], stack.device)
    time_ids = _time_ids(pipe, first.width, first.height, stack.dtype, stack.device)
    out: list[Picture | None] = [None] * len(renders)

    for group in _same_length_groups(timelines):
        members = [renders[i] for i in group]
        mine = [timelines[i] for i in group]
        scheduler = samplers.make_scheduler(stack.scheduler_config, first.sampler,
                                            first.schedule_type)
        seeds, cfg_scales = [r.seed for r in members], [r.cfg_scale for r in members]
        if hasattr(scheduler, "noise_sampler_seed"):
            scheduler.noise_sampler_seed = seeds
        latents = torch.stack([
            noise.initial_noise(shape, r.seed, r.subseed, r.subseed_strength,
                                (r.seed_resize_from_w, r.seed_resize_from_h)) for r in members
        ]).to(stack.device, stack.dtype)
        generators = [noise.sampler_generator(r.seed, r.ensd, shape) for r in members]
        rows = [[controlnet.at_size(u, first.width, first.height)] * len(members)
                for u in units]
        with controlnet.stage(units, rows, stack.device, stack.dtype) as ctrl:
            latents = sampling.sample(
                pipe.unet, scheduler, latents, first.steps,
                lambda call, mine=mine: batch_conditioning(mine, call, time_ids),
                cfg_scales,
                step_kwargs={"generator": generators,
                             "eta": first.eta if first.eta is not None else 0.0},
                seeds=seeds, on_step=on_step,
                timestep_cond=_guidance_embedding(pipe, cfg_scales, stack.dtype,
                                                  stack.device),
                image_conditioning=(None if everything is None else
                                    everything[group].to(stack.device, stack.dtype)),
                control=ctrl)
        for i, picture in zip(group, pictures(pipe, latents), strict=True):
            out[i] = picture
    return out
