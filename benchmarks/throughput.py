"""Throughput of a small sweep: sdbatch's executors against a hand-written diffusers loop
that makes one image per pipeline call, in one run.

The matrix is 2 prompts x 2 CFG scales x --seeds seeds (3: 12 images), Euler a, 8 steps,
64x64, on random weights with the real SD1.5 shapes (random weights cost what trained ones
cost). Small latents are bound by streaming the weights, so sharing forward passes
(executor.max_batch) is the lever measured here.

Each row is a fresh process timed from its start to its exit, as a user's command is: its
imports, its model load (the loop loads the file through the same loader) and, for multi,
its workers' start-up and their own loads, then the rendering and the PNGs. Rows alternate,
--repeats times each; every side runs with --threads torch threads (multi: two CPU workers
of one thread each). Prints the median wall of each row, its ratio to the loop and to the
local row, and images per second.

    python benchmarks/throughput.py --repeats 3 --rows loop,local,multi
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, euler_a_pipeline, median, random_checkpoint

PROMPTS = ["a red building, lawn, blue sky", "a blue tower by the sea, evening"]
CFG_SCALES = [5.0, 7.0]
ROWS = {"loop": "diffusers loop, one image per call",
        "local": "sdbatch, executor=local (defaults)",
        "multi": "sdbatch, executor=multi, 2 CPU workers x 1 thread"}


def cells(seeds: int) -> list[tuple[str, float, int]]:
    return [(p, cfg, seed) for p in PROMPTS for cfg in CFG_SCALES for seed in range(1, seeds + 1)]


def job(checkpoint: str, steps: int, seeds: int, executor: dict) -> dict:
    """The sweep as an sdbatch job, with the job's defaults but for the executor's keys."""
    return {"model": {"checkpoint": checkpoint}, "prompt": PROMPTS,
            "params": {"sampler": "Euler a", "steps": steps, "cfg_scale": CFG_SCALES,
                       "seed": list(range(1, seeds + 1)), "width": 64, "height": 64},
            "executor": executor}


def diffusers_loop(checkpoint: str, steps: int, seeds: int, out: Path) -> None:
    """The baseline: one StableDiffusionPipeline call per image, each saved as a PNG."""
    import torch

    pipe = euler_a_pipeline(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, cfg, seed) in enumerate(cells(seeds)):
        [image] = pipe(prompt, negative_prompt="", guidance_scale=cfg, num_inference_steps=steps,
                       height=64, width=64, generator=torch.Generator().manual_seed(seed)).images
        image.save(out / f"{i:05d}.png")


def row(name: str, checkpoint: str, steps: int, seeds: int, threads: int, out: Path) -> None:
    """One row, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    if name == "loop":
        diffusers_loop(checkpoint, steps, seeds, out)
        return
    from sdbatch.cli import run_job  # the command line's own way in (multi's early start)
    from sdbatch.schema import validate

    executor = ({"threads": threads} if name == "local" else
                {"name": "multi", "devices": ["cpu", "cpu"], "threads": 1})
    raw = {**job(checkpoint, steps, seeds, executor),
           "run": {"dir": str(out), "progress": "quiet"}}
    code = run_job(validate(raw), lambda key: f"benchmark row {name}", [])
    if code:
        raise SystemExit(f"row {name} exited {code}")


def timed(name: str, ns: argparse.Namespace, checkpoint: Path, out: Path) -> float:
    argv = [sys.executable, __file__, "--row", name, "--out", str(out), "--steps",
            str(ns.steps), "--seeds", str(ns.seeds), "--threads", str(ns.threads),
            "--cache", str(ns.cache)]
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"row {name} failed:\n{done.stdout}\n{done.stderr}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="loop,local,multi", help=f"some of {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per cell (3: 12 images)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdbatch-bench"))
    ap.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # a child: one row
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    checkpoint = random_checkpoint("sd15", ns.cache / "sd15-random.safetensors")
    if ns.row:
        row(ns.row, str(checkpoint), ns.steps, ns.seeds, ns.threads, ns.out)
        return
    rows = ns.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; give some of {', '.join(ROWS)}")
    walls: dict[str, list[float]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(ns.repeats):
            for name in rows:
                walls[name].append(timed(name, ns, checkpoint, Path(tmp) / f"{rep}-{name}"))
                print(f"  {name} #{rep + 1}: {walls[name][-1]:.1f} s", flush=True)

    images = len(cells(ns.seeds))
    print(f"SD1.5 shapes (random weights), {len(PROMPTS)} prompts x {len(CFG_SCALES)} CFG x "
          f"{ns.seeds} seeds = {images} images, Euler a, {ns.steps} steps, 64x64, "
          f"{ns.threads} torch thread(s); each row a fresh process, start to exit; "
          f"median of {ns.repeats}:")
    print("| row | wall s | x loop | x local | images/s |")
    print("|---|---:|---:|---:|---:|")
    medians = {name: median(values) for name, values in walls.items()}
    for name, wall in medians.items():
        ratios = [f"{wall / medians[base]:.2f}" if base in medians else "-"
                  for base in ("loop", "local")]
        print(f"| {ROWS[name]} | {wall:.1f} | {' | '.join(ratios)} | {images / wall:.2f} |")


if __name__ == "__main__":
    main()
