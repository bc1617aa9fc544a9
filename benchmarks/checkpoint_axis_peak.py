"""Peak memory of a job with a checkpoint axis of two different checkpoints, against the
same job on one checkpoint (the baseline), and with executor.stack_cache_gb keeping both.

Random fp16 weights in the real SD1.5 shapes (made once into --cache), a second file that
differs in one weight (another identity, so another stack); each job runs in a fresh
process (`python -m sdbatch`), its peak RSS read from the kernel.

    python benchmarks/checkpoint_axis_peak.py --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import GIB, REPO, median, random_checkpoint, run_peak


def second_checkpoint(first: Path, path: Path) -> Path:
    """The same file with one byte of its last weight changed: another hash, another stack."""
    if not path.exists():
        shutil.copyfile(first, path)
        with open(path, "r+b") as f:
            f.seek(-2, 2)
            byte = f.read(1)
            f.seek(-2, 2)
            f.write(bytes([byte[0] ^ 1]))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdbatch-bench"))
    ns = ap.parse_args()
    models = ns.cache / "models"
    sd = models / "Stable-diffusion"
    sd.mkdir(parents=True, exist_ok=True)
    a = random_checkpoint("sd15", sd / "a.safetensors")
    second_checkpoint(a, sd / "b.safetensors")
    cases = {"one checkpoint (baseline)": ("[a]", 0),
             "two, stack_cache_gb=0": ("[a,b]", 0),
             "two, stack_cache_gb=8 (both kept)": ("[a,b]", 8)}
    peaks = {}
    for rep in range(ns.repeats):
        for name, (checkpoints, budget) in cases.items():
            run_dir = ns.cache / "runs" / f"{rep}-{len(peaks.get(name, []))}-{budget}"
            shutil.rmtree(run_dir, ignore_errors=True)
            peak, _ = run_peak([sys.executable, "-m", "sdbatch", f"paths.models={models}",
                                f"model.checkpoint={checkpoints}", "prompt=a house",
                                "params.steps=1", "params.width=64", "params.height=64",
                                "params.sampler=Euler", f"executor.stack_cache_gb={budget}",
                                "run.progress=quiet", f"run.dir={run_dir}"],
                               env={"SDBATCH_CACHE": str(ns.cache / "sdbatch-cache")}, cwd=REPO)
            peaks.setdefault(name, []).append(peak)
    base = median(peaks["one checkpoint (baseline)"])
    print(f"SD1.5 shapes, fp32 on the CPU, 64x64, 1 step; median peak RSS of {ns.repeats}:")
    for name, values in peaks.items():
        print(f"  {name:34} {median(values) / GIB:6.2f} GiB   x{median(values) / base:.2f}")


if __name__ == "__main__":
    main()
