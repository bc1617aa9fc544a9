"""Wall time of a 24-image job on the embedded tiny model, with and without the writer
thread (PNG encoding, fsyncs and manifest lines beside rendering, or in the render loop).

Runs alternate in one process; prints the median of --repeats each and the ratio.

    python benchmarks/writer_wall.py --repeats 5
"""

from __future__ import annotations

import argparse

from common import median, walls_by_switch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="width and height in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ns = ap.parse_args()

    from sdbatch.output import writer

    job = {"prompt": ["a red house", "a blue tower", "a yellow house"],
           "params": {"sampler": "Euler", "steps": ns.steps, "seed": [1, 2, 3, 4],
                      "cfg_scale": [5, 7], "width": ns.size, "height": ns.size}}
    walls = walls_by_switch(job, lambda on: setattr(writer, "THREADED", on), ns.repeats)
    off, on = median(walls[False]), median(walls[True])
    print(f"24 images {ns.size}x{ns.size}, {ns.steps} steps, median of {ns.repeats}:")
    print(f"  writer in the render loop  {off:6.2f} s")
    print(f"  writer thread              {on:6.2f} s   ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
