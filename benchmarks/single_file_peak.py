"""Peak memory of loading a single file: SD1.5 and SDXL shapes, fp32 and fp16 loads.

Each load runs in a fresh process that resets its peak (VmHWM) after the imports, so the
figure is what the load itself costs; it is compared with the loaded weights (issue 9: at
most 1.25x). Linux only (/proc). Random fp16 weights in the real shapes are made once into
--cache (SD1.5 2.0 GiB, SDXL 6.5 GiB).

    python benchmarks/single_file_peak.py --families sd15 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import GIB, REPO, median, random_checkpoint, run_peak


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(path: str, dtype: str) -> None:
    import torch

    from sdbatch.models.single_file import load_single_file
    from sdbatch.models.stack import Stack

    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    pipe = load_single_file(path, dtype=getattr(torch, dtype))
    weights = Stack(None, pipe, {}, None, None).nbytes()
    print(json.dumps({"base": base, "peak": status("VmHWM"), "weights": weights}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["sd15"], choices=["sd15", "sdxl"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdbatch-bench"))
    ns = ap.parse_args()
    print(f"{'shapes':6} {'load':8} {'weights GiB':>11} {'peak GiB':>9} {'peak/weights':>12}"
          "   (median of the load's own peak, beyond the imports)")
    for family in ns.families:
        path = random_checkpoint(family, ns.cache / f"{family}-random-fp16.safetensors")
        for dtype in ns.dtypes:
            runs = []
            for _ in range(ns.repeats):
                _, out = run_peak([sys.executable, __file__, "--child", str(path), dtype],
                                  cwd=REPO)
                runs.append(json.loads(out.strip().splitlines()[-1]))
            weights = runs[0]["weights"]
            peak = median(r["peak"] - r["base"] for r in runs)
            print(f"{family:6} {dtype:8} {weights / GIB:11.2f} {peak / GIB:9.2f} "
                  f"{peak / weights:12.2f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4])
    else:
        main()
