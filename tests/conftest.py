"""Tests run offline on the embedded tiny model, built once per session into a temp cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def sdbatch_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("sdbatch-cache")
    os.environ["SDBATCH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_spec(sdbatch_cache):
    from sdbatch.models.stack import StackSpec
    from sdbatch.models.tiny import ensure

    return StackSpec("tiny", ensure(), "auto")


@pytest.fixture(scope="session")
def tiny_stack(tiny_spec):
    import torch

    from sdbatch.models.stack import load

    return load(tiny_spec, torch.device("cpu"))


def write_job(folder: Path, name: str, text: str) -> Path:
    (folder / "jobs").mkdir(parents=True, exist_ok=True)
    path = folder / "jobs" / f"{name}.yaml"
    path.write_text(text)
    return path


def sdbatch(cwd: Path, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in ``cwd``."""
    proc = subprocess.run([sys.executable, "-m", "sdbatch", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ}, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"sdbatch {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


SMALL_JOB = """# @package _global_
job:
  name: small
prompt: ["a red house", "a blue tower"]
negative_prompt: "blurry"
params:
  sampler: Euler a
  steps: 4
  cfg_scale: [5, 7]
  seed: 11
  width: 64
  height: 64
run:
  progress: quiet
"""
