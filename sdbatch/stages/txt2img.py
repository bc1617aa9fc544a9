"""txt2img: noise from each image's own seed, denoised by the job's sampler.

The initial noise of every image is drawn on the CPU from a generator seeded with that
image's seed, and the same generator feeds the sampler's later noise (ancestral samplers);
SDE samplers get a Brownian tree per image seed. So an image depends on its seed alone,
not on its batch, its device's RNG or how many workers ran the job.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from sdbatch import samplers
from sdbatch.matrix import Render
from sdbatch.models.embeddings import expand_triggers
from sdbatch.models.stack import Stack
from sdbatch.prompts.encode import encode

StepCallback = Callable[[int, int], None]  # (step done, steps)


def initial_noise(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Generator]:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator), generator


def prompt_texts(pipe, renders: tuple[Render, ...], field: str) -> list[str]:
    """The renders' prompts with multi-vector embedding triggers spelled out for the tokenizer."""
    return [expand_triggers(pipe.tokenizer, getattr(r, field)) for r in renders]


def run(stack: Stack, renders: tuple[Render, ...], on_step: StepCallback | None = None
        ) -> list[Image.Image]:
    first = renders[0]
    pipe = stack.pipe
    pipe.scheduler = samplers.make_scheduler(stack.scheduler_config, first.sampler,
                                             first.schedule_type)
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        pipe.scheduler.noise_sampler_seed = [r.seed for r in renders]

    cond = encode(pipe.tokenizer, pipe.text_encoder, prompt_texts(pipe, renders, "prompt"),
                  first.clip_skip, stack.device)
    uncond = encode(pipe.tokenizer, pipe.text_encoder,
                    prompt_texts(pipe, renders, "negative_prompt"), first.clip_skip, stack.device)
    channels = pipe.vae.config.latent_channels
    shape = (channels, first.height // 8, first.width // 8)
    noise, generators = zip(*(initial_noise(r.seed, shape) for r in renders), strict=True)
    latents = torch.stack(noise).to(stack.device, stack.dtype)

    def step_end(_pipe, i, _t, kwargs):
        if on_step:
            on_step(i + 1, first.steps)
        return kwargs

    out = pipe(
        prompt_embeds=cond.to(stack.dtype), negative_prompt_embeds=uncond.to(stack.dtype),
        latents=latents, generator=list(generators), num_inference_steps=first.steps,
        guidance_scale=first.cfg_scale, width=first.width, height=first.height,
        output_type="pil", callback_on_step_end=step_end,
    )
    return out.images
