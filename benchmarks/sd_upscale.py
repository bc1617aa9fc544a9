"""Peak memory and wall of SD upscale at x2, x4 and x8 on the embedded tiny model: 64 px
tiles overlapping by 16, batch_size tiles per forward pass, 6 steps at denoise 0.4, from
a 64x64 txt2img picture.

Each scale runs in a fresh process (peak RSS is a process's high-water mark); it prints
the tiles, the wall of the SD upscale step alone, its seconds per tile, and the peak RSS
the step adds over the loaded model and its first picture.

    python benchmarks/sd_upscale.py --scales 2 4 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(scale: int, batch: int) -> dict:
    import torch

    from sdbatch import matrix, tiles
    from sdbatch.models.stack import StackSpec, load
    from sdbatch.models.tiny import model_folder
    from sdbatch.plan import make_plan
    from sdbatch.schema import validate
    from sdbatch.stages import sd_upscale, txt2img
    from sdbatch.stages.common import Item

    torch.set_num_threads(2)
    stack = load(StackSpec("tiny", model_folder(), "auto"), torch.device("cpu"))
    job = validate({"prompt": "a red building, lawn, blue sky",
                    "params": {"sampler": "Euler", "steps": 6, "seed": 3, "width": 64,
                               "height": 64, "batch_size": batch},
                    "post": [{"sd_upscale": {"scale": scale, "tile_overlap": 16}}]})
    render = matrix.expand(matrix.resolve_seeds(job, 0))[0]
    params = make_plan([render], {"tiny": "t"}, 1).chains[0][1].params
    source = txt2img.run(stack, (render,))[0]
    sd_upscale.run(stack, [Item(render, {**params, "scale": 1, "width": 64, "height": 64,
                                         "output_size": [64, 64]}, source)])  # warm up
    base = rss_mib()
    start = time.perf_counter()
    [out] = sd_upscale.run(stack, [Item(render, params, source)])
    wall = time.perf_counter() - start
    grid = tiles.layout(*out.image.size, 64, 64, 16)
    n = len(grid.xs) * len(grid.ys)
    return {"scale": scale, "size": out.image.size[0], "tiles": n, "wall_s": round(wall, 2),
            "s_per_tile": round(wall / n, 3), "peak_added_mib": round(rss_mib() - base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.one:
        print(json.dumps(one(ns.one, ns.batch_size)))
        return
    print("| scale | picture | tiles | wall | s / tile | peak RSS added |")
    print("|---|---|---|---|---|---|")
    for scale in ns.scales:
        out = subprocess.run([sys.executable, __file__, "--one", str(scale), "--batch-size",
                              str(ns.batch_size)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| x{r['scale']} | {r['size']} px | {r['tiles']} | {r['wall_s']} s | "
              f"{r['s_per_tile']} s | {r['peak_added_mib']} MiB |")


if __name__ == "__main__":
    main()
