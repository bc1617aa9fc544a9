"""Do two renders at once slow each other? One forward-pass-sharing batch (6 images, 8
steps, 64x64, CFG, SD1.5 shapes with random weights, one torch thread) timed in a warm
process alone, then in two processes started together: executor=multi's rendering on two
CPU workers, without its start-up and loads (see the Performance section of the README).

    python benchmarks/pass_contention.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, euler_a_pipeline, random_checkpoint


def child(checkpoint: str, at: float) -> None:
    import torch

    torch.set_num_threads(1)
    pipe = euler_a_pipeline(checkpoint)
    pipe("warm-up", num_inference_steps=1, height=64, width=64)
    while time.time() < at:
        time.sleep(0.01)
    start = time.perf_counter()
    pipe(["a red building, lawn, blue sky"] * 6, num_inference_steps=8, height=64, width=64,
         guidance_scale=7)
    print(f"{time.perf_counter() - start:.1f}", flush=True)


def together(n: int, checkpoint: Path, lead_s: float) -> list[float]:
    """n processes whose passes start at one moment, lead_s from now (after their loads)."""
    at = time.time() + lead_s
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(at), "--checkpoint",
                               str(checkpoint)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    return [float(p.communicate()[0].split()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdbatch-bench"))
    ap.add_argument("--lead", type=float, default=40.0, help="seconds allowed for the loads")
    ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        child(ns.checkpoint, ns.child)
        return
    checkpoint = random_checkpoint("sd15", ns.cache / "sd15-random.safetensors")
    [alone] = together(1, checkpoint, ns.lead)
    both = together(2, checkpoint, ns.lead)
    print(f"one pass of 6 images (SD1.5 shapes, 8 steps, 64x64, 1 thread): alone {alone:.1f} s,"
          f" two at once {both[0]:.1f} s and {both[1]:.1f} s "
          f"({max(both) / alone:.2f} x alone)")


if __name__ == "__main__":
    main()
