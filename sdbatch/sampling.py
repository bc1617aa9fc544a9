"""sdbatch's denoising loop: one sampler run over a diffusers scheduler and the UNet.

Owning the loop (instead of calling a diffusers pipeline) is what lets sdbatch count as
the WebUI does. A second-order sampler (Heun, DPM2, DPM2 a, DPM++ SDE) calls the model
twice a sampling step; the WebUI's denoiser counts those calls and builds its prompt
schedules over steps x 2 of them, while its progress bar counts sampling steps. Here
`conditioning(call)` receives the model-call count and `on_step` the sampling step, so
both are right for every sampler. Guidance is the WebUI's composable form (`AND`):

    guided = uncond + sum_i weight_i * cfg * (cond_i - uncond)

Each image of a pass has its own CFG scale, so images that differ only in it share the
pass. An image at CFG 1 with one plain part needs no negative: its negative row is left
out of the model call and its output is its prompt's alone, as if it ran by itself.

Later stages start the same loop part way (`start_step` with `init_latents`, img2img) and
re-impose latents after every step (`on_latents`, inpainting).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """The UNet's text inputs for one model call over a batch of B images.

    Rows [0, B) of `context` are the images' negative prompts; every later row is one
    `AND` part of one image, and `parts[i]` lists image i's (row, weight) pairs.
    SDXL adds `pooled` and `time_ids`, row for row with `context`. `lengths`: the
    negatives' and the parts' token lengths where they differ; the model then takes them
    in two passes, each on its own length, as the WebUI does with pad_cond_uncond off.
    """
    context: torch.Tensor
    parts: tuple[tuple[tuple[int, float], ...], ...]
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    lengths: tuple[int, int] | None = None

    def plain(self, image: int) -> bool:
        """One part of weight 1: guidance at scale 1 is the prompt alone."""
        parts = self.parts[image]
        return len(parts) == 1 and parts[0][1] == 1.0


def webui_timesteps(steps: int, t_enc: int | None) -> tuple[list[int], int | None]:
    """The WebUI's DDIM and PLMS timesteps (sd_samplers_timesteps): the grid clip(range(0,
    1000, 1000 // steps) + 1, 0, 999), the model called at each point but the first, from
    the top (20 steps: 951 down to 51, 19 calls, the last going to t = 1); with ``t_enc``
    (an img2img's denoise x steps) the picture is noised to grid[t_enc] and the calls go
    from grid[t_enc - 1]. (The calls' timesteps, the noise's timestep or None.) diffusers'
    DDIM and PNDM step from each to t - 1000 // steps, the grid's previous point (but from
    a top point clipped to 999, as at 3 or 9 steps: one below the WebUI's)."""
    grid = [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]
    if t_enc is None:
        return grid[:0:-1], None
    return (grid[t_enc - 1:0:-1] if t_enc > 1 else []), grid[t_enc]


def _uniform(scheduler) -> bool:
    config = scheduler.config
    return config.timestep_spacing == "linspace" and not any(
        config.get(flag) for flag in ("use_karras_sigmas", "use_exponential_sigmas",
                                      "use_beta_sigmas"))


def lcm_timesteps(steps: int) -> list[int]:
    """The WebUI's LCM steps (sd_samplers_lcm): ``steps`` points spread evenly over the 50
    original LCM steps (t = 19, 39, ..., 999), each taken at its nearest: 4 steps are 999,
    679, 339, 19. (diffusers' own choice for 4 steps is 999, 759, 499, 259.)"""
    if steps == 1:
        return [999]
    return [round(49 - 49 * i / (steps - 1)) * 20 + 19 for i in range(steps)]


def calls_per_step(scheduler) -> int:
    """Model calls per sampling step, as the WebUI counts them for prompt schedules."""
    return getattr(scheduler, "order", 1)


def needs_negative(cond: Conditioning, cfg_scales: Sequence[float]) -> tuple[bool, ...]:
    """Per image: does its guidance need its negative prompt's pass (not CFG 1 on a plain
    prompt)?"""
    return tuple(not (cfg == 1.0 and cond.plain(i)) for i, cfg in enumerate(cfg_scales))


def guide(out: torch.Tensor, cond: Conditioning, cfg_scales: Sequence[float],
          negatives: Sequence[bool]) -> torch.Tensor:
    """The WebUI's combine_denoised, per image with its own CFG scale: its negative plus its
    weighted, scaled parts. ``out`` holds the model's rows as _unet orders them: the
    negatives of the images marked in ``negatives``, then every image's parts; an image
    without a negative is its one part."""
    batch, first = len(cond.parts), sum(negatives)
    uncond_row = {i: k for k, i in enumerate(i for i in range(batch) if negatives[i])}
    guided = []
    for i, parts in enumerate(cond.parts):
        rows = [row - batch + first for row, _ in parts]  # context row -> out row
        if not negatives[i]:
            guided.append(out[rows[0]])
            continue
        uncond = out[uncond_row[i]]
        image = uncond.clone()
        for row, (_, weight) in zip(rows, parts, strict=True):
            image += (out[row] - uncond) * (weight * cfg_scales[i])
        guided.append(image)
    return torch.stack(guided)
def brownian_noise(scheduler, latents: torch.Tensor, seeds: list[int]
                   ) -> Callable[[int], torch.Tensor]:
    """Per-image Brownian-tree noise for a multistep SDE scheduler (DPM++ 2M/3M SDE), as the
    WebUI's BrownianTreeNoiseSampler gives k-diffusion: seeded from each image's seed, so the
    noise of a step depends on the step's sigmas and the seed, not on the batch. Imported
    here: its module pulls in scipy (a second or more of every process's start)."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    sigmas = scheduler.sigmas
    positive = sigmas[sigmas > 0]
    sampler = BrownianTreeNoiseSampler(latents.float(), positive.min().item(),
                                       sigmas.max().item(), seeds)

    def noise(i: int) -> torch.Tensor:
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        if sigma_next <= 0:  # the last step lands on sigma 0 and adds no noise
            return torch.zeros_like(latents, dtype=torch.float32)
        return sampler(sigma, sigma_next).to(latents.device)

    return noise


def uses_variance_noise(scheduler) -> bool:
    return getattr(scheduler.config, "algorithm_type", "").startswith("sde-")


@torch.no_grad()
def sample(unet, scheduler, noise: torch.Tensor, steps: int,
           conditioning: Callable[[int], Conditioning], cfg_scale: float | Sequence[float],
           *,
           step_kwargs: dict | None = None, seeds: list[int] | None = None,
           timestep_cond: torch.Tensor | None = None,
           start_step: int = 0, init_latents: torch.Tensor | None = None,
           on_step: Callable[[int, int], None] | None = None,
           on_latents: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
           mask: torch.Tensor | None = None, image_conditioning: torch.Tensor | None = None,
           control=None) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) over `steps` sampling steps; returns the final latents.

    `conditioning(call)` gives the text inputs for model call `call` (0-based); `cfg_scale`
    is one scale for every image or one per image. `seeds`
    (one per image) seed the Brownian trees of the SDE samplers. With `start_step`, the
    first steps are skipped and `init_latents` noised to where sampling starts (img2img).
    `on_step(done, steps)` reports each finished sampling step; `on_latents(step, x)`
    may replace the latents after it.

    Inpainting: with `mask` (B, 1, h, w; 1 = repaint) every model call's denoised
    prediction is `init_latents` outside the mask (the WebUI's CFGDenoiser, for 4-channel
    models), so the sampler steers the unmasked part to the picture; `image_conditioning`
    (B, 5, h, w: mask and masked-image latents) is concatenated to the UNet's input
    (9-channel models).

    ``control`` (sdbatch.control.Control) adds its ControlNet units' residuals to every
    model call whose sampling step lies in a unit's window (counted in the steps this run
    samples, from ``start_step``).
    """
    device = noise.device
    # a second-order step is two calls (the last step only one: it lands on sigma 0), so
    # step s starts at call s x calls per step, as diffusers' img2img pipelines slice
    first_call = start_step * calls_per_step(scheduler)
    timesteps, noised_at, webui_grid = _schedule(scheduler, steps, start_step, first_call,
                                                 init_latents is not None, device)
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(init_latents, noise, noised_at)
    kwargs = dict(step_kwargs or {})
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    scales = ([float(cfg_scale)] * len(noise) if isinstance(cfg_scale, int | float)
              else [float(c) for c in cfg_scale])
    variance = (brownian_noise(scheduler, latents, seeds)
                if uses_variance_noise(scheduler) and seeds is not None else None)

    done = start_step
    for i, t in enumerate(timesteps):
        call = first_call + i
        if i and getattr(scheduler, "state_in_first_order", True):
            done += 1
            latents = _finish_step(done, steps, latents, on_step, on_latents)
        cond = conditioning(call)
        negatives = ((False,) * len(cond.parts) if timestep_cond is not None
                     else needs_negative(cond, scales))
        latents_in = scheduler.scale_model_input(latents, t)
        x_t = latents_in
        if image_conditioning is not None:
            latents_in = torch.cat([latents_in, image_conditioning.to(latents_in)], dim=1)
        out = _unet(unet, latents_in, t, cond, negatives, timestep_cond, control, x_t,
                    (done - start_step, steps - start_step))
        if any(negatives):
            out = guide(out, cond, scales, negatives)
        if mask is not None:
            alpha, sigma = noise_level(scheduler, latents, x_t, t)
            if bool((sigma > 1e-4).all()):  # at no noise (a last midpoint) the input is its
                # own prediction
                out = keep_known(out, x_t, alpha, sigma, init_latents, mask,
                                 scheduler.config.get("prediction_type", "epsilon"))
        if variance is not None:
            kwargs["variance_noise"] = variance(call)
        latents = scheduler.step(out, t, latents, **kwargs, return_dict=False)[0]
    # the WebUI's DDIM makes a call fewer than its steps (two from an img2img's): it is done
    return _finish_step(steps if webui_grid else done + 1, steps, latents, on_step, on_latents)


def _schedule(scheduler, steps: int, start_step: int, first_call: int, img2img: bool,
              device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The timesteps a run from ``start_step`` (model call ``first_call``) calls the model
    at, as the WebUI's samplers
    take them, the timestep an img2img's picture is noised to, and whether they are the
    WebUI's DDIM / PLMS grid (whose calls are fewer than its steps)."""
    kind = type(scheduler).__name__
    if kind == "LCMScheduler":
        scheduler.set_timesteps(device=device, timesteps=lcm_timesteps(steps))
    elif kind == "DPMSolverMultistepScheduler" and _uniform(scheduler):
        # the WebUI's Uniform: the model's sigmas at t = linspace(999, 0, steps), then 0;
        # diffusers' own spreads steps + 1 points and drops the last (at 20 steps its last
        # sigma is 0.23, the WebUI's 0.03)
        scheduler.set_timesteps(device=device, timesteps=[
            round(999 - 999 * i / max(steps - 1, 1)) for i in range(steps)])
    else:
        scheduler.set_timesteps(steps, device=device)
    if kind not in ("DDIMScheduler", "PNDMScheduler"):
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first_call)
        timesteps = scheduler.timesteps[first_call:]
        return timesteps, timesteps[:1], False
    calls, noised_at = webui_timesteps(steps, steps - start_step - 1 if img2img else None)
    if kind == "PNDMScheduler" and calls:
        # PLMS' first step calls the model again at the next point (pseudo improved Euler),
        # which diffusers' PNDM takes as a repeated timestep
        below = [*calls[1:], calls[-1] - scheduler.config.num_train_timesteps // steps]
        calls = [calls[0], below[0], *below[:-1]]
        # PNDM finds the first point again as the second plus the stride: 1000 where the
        # WebUI clipped it to 999 (3 or 9 steps), which takes 999's alpha
        alphas = scheduler.alphas_cumprod
        if len(alphas) == scheduler.config.num_train_timesteps:
            scheduler.alphas_cumprod = torch.cat([alphas, alphas[-1:]])
    dtype = scheduler.timesteps.dtype
    return (torch.tensor(calls, dtype=dtype, device=device),
            torch.tensor([noised_at or 0], dtype=dtype, device=device), True)


def noise_level(scheduler, latents: torch.Tensor, x_t: torch.Tensor, t
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the model's input x_t = alpha * x0 + sigma * eps at this call.

    k-diffusion style schedulers keep latents = x0 + s * eps and feed latents / sqrt(1+s^2):
    alpha is that ratio (whatever s this call uses: Heun's, DPM2's midpoint...). The others
    feed the latents as they are, at the noise of their sigma table or of alphas_cumprod."""
    if scheduler.init_noise_sigma > 1.0:  # per image: its bits never depend on its batch
        x, lat = x_t.float(), latents.float()
        alpha = (x * lat).sum((1, 2, 3), keepdim=True) / (lat * lat).sum((1, 2, 3),
                                                                          keepdim=True)
    else:
        sigmas = getattr(scheduler, "sigmas", None)
        where = (scheduler.timesteps == t).nonzero()
        if sigmas is not None and len(where) and len(sigmas) > len(scheduler.timesteps) - 1:
            alpha = 1 / torch.sqrt(1 + sigmas[int(where[0])].to(x_t.device) ** 2)
        else:
            alpha = scheduler.alphas_cumprod[int(t)].to(x_t.device).sqrt()
    alpha = alpha.to(torch.float32).clamp(1e-6, 1.0)
    return alpha, torch.sqrt(1 - alpha * alpha)


def keep_known(out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
               known: torch.Tensor, mask: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model output whose denoised prediction is ``known`` where ``mask`` is 0 and the
    model's own where it is 1 (the WebUI's inpainting blend), in the model's parameterisation
    (epsilon, v or sample)."""
    o, x = out.float(), x_t.float()
    if prediction == "v_prediction":
        x0 = alpha * x - sigma * o
    elif prediction == "sample":
        x0 = o
    else:
        x0 = (x - sigma * o) / alpha
    x0 = known.float() * (1 - mask) + x0 * mask
    eps = (x - alpha * x0) / sigma
    if prediction == "v_prediction":
        return (alpha * eps - sigma * x0).to(out.dtype)
    return (x0 if prediction == "sample" else eps).to(out.dtype)


def _finish_step(done: int, steps: int, latents: torch.Tensor, on_step, on_latents
                 ) -> torch.Tensor:
    if on_latents is not None:
        latents = on_latents(done, latents)
    if on_step is not None:
        on_step(done, steps)
    return latents


def _unet(unet, latents: torch.Tensor, t, cond: Conditioning, negatives: Sequence[bool],
          timestep_cond: torch.Tensor | None, control=None, x_t: torch.Tensor | None = None,
          step: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One model call: the negative rows of the images marked in ``negatives``, then every
    image's parts, each row with its image's latents, out in that order for guide() (with
    no negatives: each image's only part, in image order). ControlNets see ``x_t``, the
    latents without an inpainting model's extra channels; ``step``: (step, steps) of the
    stage, for their guidance windows."""
    batch = len(cond.parts)
    parts = [(i, row) for i, image_parts in enumerate(cond.parts) for row, _ in image_parts]
    uncond = [(i, i) for i in range(batch) if negatives[i]]
    if cond.lengths is None:
        return _forward(unet, latents, t, cond, uncond + parts, len(uncond),
                        cond.context.shape[1], timestep_cond, control, x_t, step)
    passes = ([(uncond, len(uncond), cond.lengths[0])] if uncond else []) + \
        [(parts, 0, cond.lengths[1])]
    return torch.cat([_forward(unet, latents, t, cond, pairs, negative_rows, length,
                               timestep_cond, control, x_t, step)
                      for pairs, negative_rows, length in passes])


def _forward(unet, latents: torch.Tensor, t, cond: Conditioning,
             pairs: list[tuple[int, int]], negative_rows: int, length: int,
             timestep_cond: torch.Tensor | None, control, x_t: torch.Tensor | None,
             step: tuple[int, int]) -> torch.Tensor:
    """One forward pass over (image, context row) pairs, the first ``negative_rows`` of
    them negative prompts, on the first ``length`` tokens of the context."""
    images = [i for i, _ in pairs]
    rows = torch.tensor([row for _, row in pairs], device=cond.context.device)
    context = cond.context[rows, :length]
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled[rows], "time_ids": cond.time_ids[rows]}
    residuals = {}
    if control is not None:
        down, mid = control.residuals((latents if x_t is None else x_t)[images], t,
                                      context, images, negative_rows, *step, added)
        if down is not None:
            residuals = {"down_block_additional_residuals": down,
                         "mid_block_additional_residual": mid}
    return unet(latents[images], t, encoder_hidden_states=context,
                timestep_cond=timestep_cond, added_cond_kwargs=added, return_dict=False,
                **residuals)[0]
