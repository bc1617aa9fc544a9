"""Wall time of 1 base image x 4 hires-fix variants, with prefix sharing (the base is drawn
once, its key shared) and without (every image draws its own base), on the embedded tiny
model and on random weights with the real SD1.5 shapes, 64 -> 128 pixels.

Runs alternate in one process, the model loaded once for all of them (loading is not what
is measured); prints the median of --repeats each and the ratio.

    python benchmarks/hires_sharing.py --repeats 3 --models tiny sd15
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import median, random_checkpoint, walls_by_switch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    ap.add_argument("--steps", type=int, default=8, help="first-pass steps")
    ap.add_argument("--hires-steps", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdbatch-bench"))
    ns = ap.parse_args()

    from sdbatch import plan
    from sdbatch.models import stack as stacks

    loaded: dict = {}
    real_load = stacks.load
    stacks.load = lambda spec, device: loaded.get(spec.identity) or loaded.setdefault(
        spec.identity, real_load(spec, device))

    for model in ns.models:
        checkpoint = "tiny" if model == "tiny" else str(
            random_checkpoint("sd15", ns.cache / "sd15-random.safetensors"))
        job = {"model": {"checkpoint": checkpoint},
               "prompt": "a red building, lawn, blue sky",
               "params": {"sampler": "Euler", "steps": ns.steps, "seed": 1, "width": 64,
                          "height": 64},
               "post": [{"hires_fix": {"scale": 2, "steps": ns.hires_steps,
                                       "denoise": [0.3, 0.4, 0.5, 0.6]}}]}
        walls = walls_by_switch(job, lambda on: setattr(plan, "SHARE_PREFIXES", on),
                                ns.repeats)
        on, off = median(walls[True]), median(walls[False])
        print(f"{model}: 1 base x 4 hires, 64 -> 128 px, {ns.steps} + {ns.hires_steps} steps, "
              f"median of {ns.repeats}:")
        print(f"  every image draws its base  {off:7.2f} s")
        print(f"  base drawn once (shared)    {on:7.2f} s   ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
