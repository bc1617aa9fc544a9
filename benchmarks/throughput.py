"""Throughput of a small sweep: sdbatch's executors against a hand-written diffusers loop
that makes one image per pipeline call, in one run.

The matrix is 2 prompts x 2 CFG scales x 3 seeds (12 images), Euler a, 8 steps, 64x64, on
random weights with the real SD1.5 shapes (random weights cost what trained ones cost).
Small latents are bound by streaming the weights, so sharing forward passes
(executor.max_batch) is the lever measured here.

Rows alternate in one process, each --repeats times after one dropped warm-up image; the
model is loaded once for the loop and the local rows (loading is not what is measured),
and every side runs with --threads torch threads. The multi row (executor=multi, two CPU
workers of one thread each) starts its own workers, whose load is in its wall. Prints the
median wall of each row, its ratio to the loop, and images per second.

    python benchmarks/throughput.py --repeats 3 --executors local,multi
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

from common import median, random_checkpoint

PROMPTS = ["a red building, lawn, blue sky", "a blue tower by the sea, evening"]
CFG_SCALES = [5.0, 7.0]
SEEDS = [1, 2, 3]


def job(checkpoint: str, steps: int, executor: dict) -> dict:
    """The sweep as an sdbatch job, with the job's defaults but for the executor's keys."""
    return {"model": {"checkpoint": checkpoint}, "prompt": PROMPTS,
            "params": {"sampler": "Euler a", "steps": steps, "cfg_scale": CFG_SCALES,
                       "seed": SEEDS, "width": 64, "height": 64},
            "executor": executor}


def diffusers_loop(stack, steps: int, out: Path, first: int | None = None) -> None:
    """The baseline: one StableDiffusionPipeline call per image, each saved as a PNG."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    p = stack.pipe
    pipe = StableDiffusionPipeline(
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(stack.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cells = [(prompt, cfg, seed) for prompt in PROMPTS for cfg in CFG_SCALES for seed in SEEDS]
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, cfg, seed) in enumerate(cells[:first]):
        [image] = pipe(prompt, negative_prompt="", guidance_scale=cfg, num_inference_steps=steps,
                       height=64, width=64, generator=torch.Generator().manual_seed(seed)).images
        image.save(out / f"{i:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--executors", default="local",
                    help="comma-separated sdbatch rows: local, multi")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdbatch-bench"))
    ns = ap.parse_args()

    import torch

    from sdbatch import run as runner
    from sdbatch.models import stack as stacks
    from sdbatch.schema import validate

    torch.set_num_threads(ns.threads)
    executors = {"local": {"threads": ns.threads},
                 "multi": {"name": "multi", "devices": ["cpu", "cpu"], "threads": 1}}
    rows = ns.executors.split(",")
    for row in rows:
        if row not in executors:
            raise SystemExit(f"--executors: unknown row {row!r}; give some of "
                             f"{', '.join(executors)}")
    if "multi" in rows and importlib.util.find_spec("sdbatch.executors.multi") is None:
        raise SystemExit("--executors: this checkout has no multi executor yet; drop multi")
    checkpoint = str(random_checkpoint("sd15", ns.cache / "sd15-random.safetensors"))

    loaded: dict = {}
    real_load = stacks.load
    stacks.load = lambda spec, device: loaded.get(spec.identity) or loaded.setdefault(
        spec.identity, real_load(spec, device))

    def sdbatch(name: str, folder: Path, raw: dict) -> None:
        raw = {**raw, "run": {"dir": str(folder), "progress": "quiet"}}
        code = runner.run(validate(raw), lambda key: f"benchmark row {name}", [], ["bench"])
        assert code == 0, f"{name} exited {code}"

    walls: dict[str, list[float]] = {"loop": [], **{row: [] for row in rows}}
    with tempfile.TemporaryDirectory() as tmp:
        one = job(checkpoint, ns.steps, executors["local"])
        sdbatch("warm-up", Path(tmp) / "warm", {**one, "prompt": PROMPTS[0],
                                                "params": {**one["params"], "seed": 1,
                                                           "cfg_scale": 7}})
        [stack] = loaded.values()
        diffusers_loop(stack, ns.steps, Path(tmp) / "warm-loop", first=1)
        for rep in range(ns.repeats):
            start = time.perf_counter()
            diffusers_loop(stack, ns.steps, Path(tmp) / f"{rep}-loop")
            walls["loop"].append(time.perf_counter() - start)
            for row in rows:
                start = time.perf_counter()
                sdbatch(row, Path(tmp) / f"{rep}-{row}", job(checkpoint, ns.steps,
                                                              executors[row]))
                walls[row].append(time.perf_counter() - start)

    images = len(PROMPTS) * len(CFG_SCALES) * len(SEEDS)
    loop = median(walls["loop"])
    print(f"SD1.5 shapes (random weights), {len(PROMPTS)} prompts x {len(CFG_SCALES)} CFG x "
          f"{len(SEEDS)} seeds = {images} images, Euler a, {ns.steps} steps, 64x64, "
          f"{ns.threads} torch thread(s), median of {ns.repeats}:")
    print("| row | wall s | x loop | images/s |")
    print("|---|---:|---:|---:|")
    labels = {"loop": "diffusers loop, one image per call",
              "local": "sdbatch, executor=local (defaults)",
              "multi": "sdbatch, executor=multi, 2 CPU workers x 1 thread"}
    for name, values in walls.items():
        wall = median(values)
        print(f"| {labels[name]} | {wall:.1f} | {wall / loop:.2f} | {images / wall:.2f} |")


if __name__ == "__main__":
    main()
