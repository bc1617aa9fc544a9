"""Shared by the benchmarks: the repository's own sdbatch, medians, peak memory, random
weights in the real shapes (random weights cost what trained ones cost)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's sdbatch, not an installed one
GIB = 2**30


def median(values) -> float:
    return statistics.median(values)


def walls_by_switch(job: dict, switch, repeats: int) -> dict[bool, list[float]]:
    """Wall seconds of running ``job`` in this process with ``switch(True)`` and
    ``switch(False)`` alternately, ``repeats`` times each after one dropped warm-up round
    (model load, caches)."""
    import tempfile
    import time

    from sdbatch import run as runner
    from sdbatch.schema import validate

    walls: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats + 1):
            for on in (True, False):
                switch(on)
                raw = {**job, "run": {"dir": str(Path(tmp) / f"{rep}-{on}"),
                                      "progress": "quiet"}}
                start = time.perf_counter()
                assert runner.run(validate(raw), lambda key: "bench", [], ["bench"]) == 0
                if rep:
                    walls[on].append(time.perf_counter() - start)
    return walls


def euler_a_pipeline(checkpoint: str | Path):
    """The hand-written baseline's pipeline: diffusers' StableDiffusionPipeline with Euler a
    over a single file loaded through sdbatch's loader (so loads cost the same on both
    sides), no safety checker, no progress bar."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from sdbatch.models.single_file import load_single_file

    p = load_single_file(checkpoint)
    pipe = StableDiffusionPipeline(
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(p.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_peak(argv: list[str], env: dict | None = None, cwd: Path = REPO) -> tuple[int, str]:
    """Run a command; return its peak RSS in bytes (ru_maxrss of the child) and its output."""
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{out}")
    return usage.ru_maxrss * 1024, out


def random_checkpoint(family: str, path: Path) -> Path:
    """A single file in the family's real shapes with random fp16 weights (made once)."""
    if path.exists():
        return path
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdbatch.models import families, ldm_export

    folder = families.config_folder(family)
    torch.set_default_dtype(torch.float16)
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(
                      UNet2DConditionModel.load_config(folder / "unet")),
                  "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                  "text_encoder": CLIPTextModel(
                      CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if (folder / "text_encoder_2").is_dir():
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in models.values():
            model.to_empty(device="cpu")
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.normal_(0, 0.02, generator=gen)
            for name, t in model.named_buffers():
                if name.endswith("position_ids"):
                    t.copy_(torch.arange(t.shape[-1]).expand_as(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    ldm_export.save_single_file(SimpleNamespace(**models), tmp)
    os.replace(tmp, path)
    return path
