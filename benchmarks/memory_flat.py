"""Memory of a long sweep: a 500-image job over two model stacks (the embedded tiny and a
copy of it under another name), run as `python -m sdbatch` in a child process whose RSS
(and each worker's, for an executor with worker processes) is read every 50 images.

Passes when every process's RSS stays within 5% of its value after the first 50 images:
nothing a run holds may grow with the images it has made.

    python benchmarks/memory_flat.py                       # local executor
    python benchmarks/memory_flat.py executor=multi 'executor.devices=[cpu,cpu]'

Arguments after the options are Hydra overrides added to the job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import REPO

MIB = 2**20


def two_stacks(tmp: Path) -> list[str]:
    """tiny, and a copy of its folder with one more file, so its hash (and so its stack
    identity) differs: the sweep loads and switches between two stacks."""
    from sdbatch.models import tiny

    copy = tmp / "tiny-copy"
    shutil.copytree(tiny.model_folder(), copy)
    (copy / "copy.txt").write_text("a second stack for benchmarks/memory_flat.py\n")
    return ["tiny", str(copy)]


def job_file(tmp: Path, checkpoints: list[str], images: int, steps: int, size: int) -> Path:
    seeds = images // (len(checkpoints) * 5)
    job = {"job": {"name": "memory_flat"},
           "model": {"checkpoint": checkpoints},
           "prompt": ["a red house", "a blue tower", "a yellow house, night",
                      "a white house, orange sky", "a purple tower, flowers"],
           "params": {"sampler": "Euler", "steps": steps, "width": size, "height": size,
                      "seed": list(range(1, seeds + 1))},
           "run": {"max_images": images, "progress": "quiet"}}
    folder = tmp / "jobs"
    folder.mkdir()
    path = folder / "memory_flat.yaml"
    path.write_text("# @package _global_\n" + json.dumps(job, indent=1))
    return path


def manifest_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def rss(proc: psutil.Process) -> dict[str, int]:
    """RSS of the driver and of each worker process it started (by pid)."""
    out = {"driver": proc.memory_info().rss}
    for child in proc.children(recursive=True):
        try:
            out[f"worker {child.pid}"] = child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. executor=multi")
    ns = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sys.path.insert(0, str(REPO))
        job = job_file(tmp, two_stacks(tmp), ns.images, ns.steps, ns.size)
        run_dir = tmp / "run"
        env = {**os.environ, "SDBATCH_JOBS": str(job.parent), "HF_HUB_OFFLINE": "1"}
        argv = [sys.executable, "-m", "sdbatch", "+job=memory_flat", f"run.dir={run_dir}",
                *ns.overrides]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        watched = psutil.Process(proc.pid)
        curve: list[tuple[int, float, dict[str, int]]] = []
        mark = ns.every
        while proc.poll() is None:
            done = manifest_lines(run_dir / "manifest.jsonl")
            if done >= mark:
                try:
                    curve.append((done, time.perf_counter() - start, rss(watched)))
                except psutil.NoSuchProcess:
                    break
                print(f"{done:5d} images  {curve[-1][1]:6.1f} s  " + "  ".join(
                    f"{k} {v / MIB:7.1f} MiB" for k, v in curve[-1][2].items()), flush=True)
                mark = (done // ns.every + 1) * ns.every
            time.sleep(0.05)
        output = proc.stdout.read()
        if proc.returncode:
            print(output)
            raise SystemExit(f"the sweep exited {proc.returncode}")
    print(output.strip().splitlines()[-1])
    if not curve:
        raise SystemExit("no point of the curve was taken")
    base = curve[0][2]
    worst = {k: max(abs(p[2][k] - v) / v for p in curve if k in p[2]) for k, v in base.items()}
    ok = all(w <= ns.tolerance for w in worst.values())
    for k, w in worst.items():
        print(f"{k}: at most {w:.1%} from its value after {curve[0][0]} images")
    print(f"flat: every process within {ns.tolerance:.0%}" if ok
          else f"NOT flat: a process moved more than {ns.tolerance:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
