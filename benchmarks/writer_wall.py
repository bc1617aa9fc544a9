"""Wall time of a 24-image job on the embedded tiny model, with and without the writer
thread (PNG encoding, fsyncs and manifest lines beside rendering, or in the render loop).

Runs alternate in one process; prints the median of --repeats each and the ratio.

    python benchmarks/writer_wall.py --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="width and height in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ns = ap.parse_args()

    from sdbatch import run as runner
    from sdbatch.output import writer
    from sdbatch.schema import validate

    job = {"prompt": ["a red house", "a blue tower", "a yellow house"],
           "params": {"sampler": "Euler", "steps": ns.steps, "seed": [1, 2, 3, 4],
                      "cfg_scale": [5, 7], "width": ns.size, "height": ns.size}}
    walls: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(ns.repeats + 1):  # the first round warms caches and is dropped
            for threaded in (False, True):
                writer.THREADED = threaded
                raw = {**job, "run": {"dir": str(Path(tmp) / f"{rep}-{threaded}"),
                                      "progress": "quiet"}}
                start = time.perf_counter()
                assert runner.run(validate(raw), lambda key: "bench", [], ["bench"]) == 0
                if rep:
                    walls[threaded].append(time.perf_counter() - start)
    off, on = median(walls[False]), median(walls[True])
    print(f"24 images {ns.size}x{ns.size}, {ns.steps} steps, median of {ns.repeats}:")
    print(f"  writer in the render loop  {off:6.2f} s")
    print(f"  writer thread              {on:6.2f} s   ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
