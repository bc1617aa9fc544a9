"""`sdbatch bench`: steps/s, images/s and peak memory of sdbatch's txt2img loop for a model
stack and batch sizes, next to a hand-written diffusers loop on the same models, measured
alternately in one process (medians of repeats), so the ratio holds on any machine.

The stack is tiny, or random weights in the real SD1.5 or SDXL shapes built offline from
sdbatch's shipped configs: random weights cost exactly what trained weights cost. Both
loops run the whole call (text encoding, Euler sampling with CFG, VAE decode, PIL images);
steps/s is steps divided by that wall, as a sweep sees it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sdbatch.matrix import Render
from sdbatch.models import families, tiny
from sdbatch.models import stack as stacks

SIZES = {"tiny": 64, "sd15": 512, "sdxl": 1024}  # each stack's native size
PROMPT, NEGATIVE = "a red house on a lawn, blue sky", "blurry, lowres"
GIB = 2**30


def random_stack(family: str, device: torch.device, dtype: torch.dtype,
                 switches: tuple[str, ...]) -> stacks.Stack:
    """A pipeline in the family's real shapes with random weights, built in memory from
    sdbatch's shipped configs (no download, no file)."""
    import diffusers
    import transformers

    stacks.quiet_libraries()
    folder = families.config_folder(family)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    parts: dict[str, object] = {}
    gen = torch.Generator(device).manual_seed(0)
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library, class_name = value
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if name.startswith("tokenizer"):
            parts[name] = cls.from_pretrained(families.tokenizer_folder(family, name))
        elif name == "scheduler":
            parts[name] = cls.from_pretrained(folder, subfolder=name)
        else:
            with torch.device("meta"):
                model = (cls.from_config(cls.load_config(folder / name)) if library == "diffusers"
                         else cls(transformers.CLIPTextConfig.from_pretrained(folder / name)))
            model = model.to(dtype)  # on meta: the weights are made in their final dtype
            model.to_empty(device=device)  # (SDXL's UNet alone is ~10 GiB in float32)
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    if t.is_floating_point():
                        t.normal_(0, 0.02, generator=gen)
                for buffer_name, t in model.named_buffers():
                    if buffer_name.endswith("position_ids"):
                        t.copy_(torch.arange(t.shape[-1]).expand_as(t))
            parts[name] = model.eval()
    pipe_class = getattr(diffusers, index["_class_name"])
    extra = ({"add_watermarker": False} if family == "sdxl"
             else {"safety_checker": None, "feature_extractor": None,
                   "requires_safety_checker": False})
    pipe = pipe_class(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    stacks.deterministic("deterministic" in switches)
    stacks.speed_up(pipe, switches)
    spec = stacks.StackSpec(f"random {family}", folder, str(dtype).removeprefix("torch."),
                            family, device=str(device), switches=switches)
    return stacks.Stack(spec, pipe, dict(pipe.scheduler.config), device, dtype)


def load_stack(model: str, device: torch.device, dtype_name: str,
               switches: tuple[str, ...]) -> stacks.Stack:
    dtype = stacks.pick_dtype(dtype_name, device)
    if why := stacks.dtype_problem(dtype_name, device):
        raise SystemExit(f"sdbatch bench: --dtype {dtype_name}: {why}")
    if model == "tiny":
        return stacks.load(stacks.StackSpec("tiny", tiny.model_folder(), dtype_name,
                                            device=str(device), switches=switches), device)
    return random_stack(model, device, dtype, switches)


def renders(batch: int, steps: int, size: int, cfg: float) -> tuple[Render, ...]:
    first = Render(0, 0, "bench", PROMPT, NEGATIVE, "Euler", "Automatic", steps, cfg, 1,
                   size, size, 1)
    return tuple(dataclasses.replace(first, index=i, seed=1 + i) for i in range(batch))


def sdbatch_loop(stack: stacks.Stack, batch: int, steps: int, size: int, cfg: float):
    from sdbatch.stages import txt2img

    todo = renders(batch, steps, size, cfg)
    return lambda: txt2img.run(stack, todo)


def diffusers_loop(stack: stacks.Stack, batch: int, steps: int, size: int, cfg: float):
    """The loop as the diffusers pipelines write it, by hand: the prompt encoded once,
    Euler with CFG over a doubled batch, the VAE decode (SDXL's fp16 VAE upcast)."""
    from diffusers import EulerDiscreteScheduler

    pipe, device, dtype = stack.pipe, stack.device, stack.dtype
    sdxl = getattr(pipe, "text_encoder_2", None) is not None

    @torch.no_grad()
    def run():
        extra = {}
        if sdxl:
            cond, uncond, pooled, pooled_u = pipe.encode_prompt(
                PROMPT, device=device, num_images_per_prompt=batch,
                do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
            ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
            extra = {"added_cond_kwargs": {"text_embeds": torch.cat([pooled_u, pooled]),
                                           "time_ids": ids.repeat(2 * batch, 1)}}
        else:
            cond, uncond = pipe.encode_prompt(PROMPT, device, batch, True, NEGATIVE)
        context = torch.cat([uncond, cond])
        scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn((batch, 4, size // 8, size // 8),
                              generator=torch.Generator().manual_seed(1)).to(device, dtype)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps = pipe.unet(x, t, encoder_hidden_states=context, **extra).sample
            u, c = eps.chunk(2)
            latents = scheduler.step(u + cfg * (c - u), t, latents).prev_sample
        vae = pipe.vae
        upcast = sdxl and vae.dtype == torch.float16
        if upcast:
            vae.to(torch.float32)
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        if upcast:
            vae.to(torch.float16)
        return pipe.image_processor.postprocess(image, output_type="pil")
    return run


class PeakMemory:
    """Peak memory of a block: CUDA's peak allocated bytes on a GPU; on a CPU the process's
    peak RSS (reset through /proc/self/clear_refs where Linux has it, else since start)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = _cpu_peak_rss()


def _cpu_peak_rss() -> int:
    if sys.platform == "win32":  # no /proc and no resource module: the working set's peak
        import psutil

        return psutil.Process().memory_info().peak_wset
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # no /proc: the peak since the process started (macOS: bytes)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(loops: dict[str, Callable[[], object]], device: torch.device, repeats: int
            ) -> dict[str, tuple[float, int]]:
    """Median wall seconds and the largest peak memory of each loop, run alternately
    after one dropped warm-up call each (kernels chosen, a compiled UNet compiled)."""
    walls: dict[str, list[float]] = {name: [] for name in loops}
    peaks = dict.fromkeys(loops, 0)
    for rep in range(repeats + 1):
        for name, loop in loops.items():
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                loop()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall = time.perf_counter() - start
            if rep:
                walls[name].append(wall)
                peaks[name] = max(peaks[name], peak.bytes)
    return {name: (statistics.median(walls[name]), peaks[name]) for name in loops}


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sdbatch bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(SIZES), default="tiny",
                        help="tiny, or random weights in the real sd15 / sdxl shapes")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--size", type=int, help="pixels a side (default: the model's own)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    for switch in stacks.SWITCHES:
        if switch != "fuse_loras":  # the bench renders without LoRAs
            parser.add_argument(f"--{switch.replace('_', '-')}", action="store_true",
                                help=f"executor.{switch}=true")
    ns = parser.parse_args(args)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    switches = tuple(s for s in stacks.SWITCHES if getattr(ns, s, False))
    device = stacks.pick_device(ns.device)
    size = ns.size or SIZES[ns.model]
    stack = load_stack(ns.model, device, ns.dtype, switches)
    where = stacks.machine(device)
    print(f"sdbatch bench: {ns.model}{' shapes, random weights' if ns.model != 'tiny' else ''}"
          f", {size}x{size}, {ns.steps} steps Euler, CFG {ns.cfg_scale:g}, on "
          f"{where['device']} ({where['device_name']}, {where['threads']} threads), "
          f"{str(stack.dtype).removeprefix('torch.')}, switches: {', '.join(switches) or 'none'}"
          f", median of {ns.repeats}")
    print(f"{'batch':>5}  {'loop':<9} {'steps/s':>8} {'images/s':>9} {'peak memory':>12}"
          f" {'wall':>8}")
    for batch in ns.batch_size:
        loops = {"sdbatch": sdbatch_loop(stack, batch, ns.steps, size, ns.cfg_scale),
                 "diffusers": diffusers_loop(stack, batch, ns.steps, size, ns.cfg_scale)}
        results = measure(loops, device, ns.repeats)
        for name, (wall, peak) in results.items():
            print(f"{batch:>5}  {name:<9} {ns.steps / wall:>8.2f} {batch / wall:>9.3f} "
                  f"{peak / GIB:>8.2f} GiB {wall:>7.2f}s")
        print(f"{'':>5}  sdbatch / diffusers wall: "
              f"{results['sdbatch'][0] / results['diffusers'][0]:.2f}")
