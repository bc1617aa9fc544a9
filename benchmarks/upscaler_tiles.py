"""Peak memory and wall of an upscaler model pass, tiled (the default 192 px tiles with 8 px
overlap) and whole, at growing output sizes: an ESRGAN (RRDBNet, 32 filters, 2 blocks,
x4, random weights; the WebUI's R-ESRGAN 4x+ has 64 filters and 23 blocks, which costs
more per pixel but grows the same way) from 128 px up to a 4096 px output.

Each case runs in a fresh process (peak RSS is a process's high-water mark); it prints
the tiles, the wall of the pass and the peak RSS the pass adds over the loaded model and
its input picture.

    python benchmarks/upscaler_tiles.py --inputs 128 256 512 1024 --whole-up-to 512
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


def one(size: int, tile: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from spandrel.architectures.ESRGAN import ESRGAN

    from sdbatch.models import spandrel_files, upscaler_models

    torch.set_num_threads(2)
    torch.manual_seed(0)
    state = ESRGAN(in_nc=3, out_nc=3, num_filters=32, num_blocks=2, scale=4).state_dict()
    model = spandrel_files._loader().load_from_state_dict(state).eval()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    cpu = torch.device("cpu")
    upscaler_models.upscale_tiled(model, image.crop((0, 0, 32, 32)), 4, tile, 8, cpu,
                                  torch.float32)  # warm up
    base = rss_mib()
    start = time.perf_counter()
    out = upscaler_models.upscale_tiled(model, image, 4, tile, 8, cpu, torch.float32)
    wall = time.perf_counter() - start
    grid = upscaler_models.tile_grid(size, size, tile, 8)
    n = len(grid.xs) * len(grid.ys) if grid else 1
    return {"input": size, "output": out.size[0], "tile": tile or "whole", "tiles": n,
            "wall_s": round(wall, 2), "s_per_tile": round(wall / n, 3),
            "peak_added_mib": round(rss_mib() - base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", nargs="+", type=int, default=[128, 256, 512, 1024])
    ap.add_argument("--whole-up-to", type=int, default=512)
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    cases = [(s, 192) for s in args.inputs] + [(s, 0) for s in args.inputs
                                               if s <= args.whole_up_to]
    for size, tile in cases:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), str(tile)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
