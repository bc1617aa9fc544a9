"""The speed switches (executor.channels_last / compile / deterministic / fuse_loras, SDPA,
bfloat16) on the tiny model: each is wired, keeps pixels within a level, and is recorded
where a resume and a reproduce read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdbatch import executors
from sdbatch import run as runner
from sdbatch.matrix import Render
from sdbatch.models import lora, tiny
from sdbatch.models import stack as stacks
from sdbatch.schema import Executor, JobError, validate
from sdbatch.stages import txt2img

pytestmark = pytest.mark.usefixtures("one_thread")


def render(stack, seed=11) -> np.ndarray:
    r = Render(0, 0, "tiny", "a red house", "blurry", "Euler", "Automatic", 3, 7.0, seed, 64, 64,
               1)
    return np.asarray(txt2img.run(stack, (r,))[0].image).astype(np.int16)


def diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def weights(model) -> dict[str, torch.Tensor]:
    """A model's own weights by their names before peft wrapped them (no LoRA parts)."""
    return {n.replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}


def spec(*switches: str) -> stacks.StackSpec:
    return stacks.StackSpec("tiny", tiny.model_folder(), "auto", switches=switches)


@pytest.fixture(scope="module")
def plain():
    return stacks.load(spec(), torch.device("cpu"))


def test_every_attention_runs_sdpa(plain):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for model in (plain.pipe.unet, plain.pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
    unet = plain.pipe.unet
    before = render(plain)
    unet.set_attn_processor(AttnProcessor())  # what a loader may leave: the full-matrix softmax
    stacks.sdpa_attention(unet)
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert diff(render(plain), before) == 0


def test_channels_last_and_deterministic_keep_the_pixels(plain):
    base = render(plain)
    try:
        stack = stacks.load(spec("channels_last", "deterministic"), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        for model in (stack.pipe.unet, stack.pipe.vae):
            convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(w.is_contiguous(memory_format=torch.channels_last)
                                 for w in convs)
        assert diff(render(stack), base) <= 1
    finally:
        stacks.deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_compile_compiles_the_unet_in_place(monkeypatch):
    """Compiling tiny's UNet takes minutes on a busy CPU core (it gives pixels within one
    level of eager, tried by hand): the test checks the wiring, not inductor."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled.append(type(self).__name__))
    stack = stacks.load(spec("compile"), torch.device("cpu"))
    assert compiled == ["UNet2DConditionModel"]
    assert type(stack.pipe.unet).__name__ == "UNet2DConditionModel"  # the same module


def test_fused_loras_render_within_a_level_and_unfuse_exactly(tmp_path):
    stack = stacks.load(spec(), torch.device("cpu"))
    pipe = stack.pipe
    base = render(stack)
    own = weights(pipe.unet)
    file = lora.write_kohya_lora(tmp_path / "a.safetensors", pipe.unet, pipe.text_encoder,
                                 seed=1)
    loras = lora.LoraSet(pipe)
    unfused = {}
    for weight in (0.8, 0.3):
        loras.apply([(file, weight)])
        unfused[weight] = render(stack)
    assert diff(unfused[0.8], base) > 10

    loras.apply([(file, 0.8)], fuse=True)
    layers = list(loras._lora_layers())
    assert layers and all(layer.disable_adapters for layer in layers)  # the weights alone run
    fused = weights(pipe.unet)
    assert any(not torch.equal(fused[n], own[n]) for n in own)
    assert diff(render(stack), unfused[0.8]) <= 1
    loras.apply([(file, 0.8)], fuse=True)  # the same weights: nothing is done again
    assert all(torch.equal(p, fused[n]) for n, p in weights(pipe.unet).items())
    loras.apply([(file, 0.3)], fuse=True)  # a new weight: unfused, then fused again
    assert diff(render(stack), unfused[0.3]) <= 1
    loras.apply([], fuse=True)
    assert all(torch.equal(p, own[n]) for n, p in weights(pipe.unet).items())  # exactly
    assert diff(render(stack), base) == 0
    loras.apply([(file, 0.8)])  # unfused adapters again
    assert diff(render(stack), unfused[0.8]) == 0
    loras.apply([])


def test_bfloat16_on_a_gpu_without_it_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    why = stacks.dtype_problem("bfloat16", torch.device("cuda"))
    assert "Tesla T4 (compute capability 7.5) has no bfloat16" in why
    assert "model.dtype=float16" in why
    assert stacks.dtype_problem("float16", torch.device("cuda")) is None
    assert stacks.dtype_problem("bfloat16", torch.device("cpu")) is None
    key, why = executors.device_problem(Executor(device="cuda:0"), "bfloat16")
    assert key == "model.dtype" and "Tesla T4" in why


def test_bfloat16_is_asked_of_each_gpu_that_renders(monkeypatch):
    """torch.cuda.is_bf16_supported asks the current GPU (cuda:0): each device is asked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: (8, 6) if str(device) == "cuda:0" else (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {device}")
    assert executors.device_problem(Executor(device="cuda:0"), "bfloat16") is None
    key, why = executors.device_problem(Executor(device="cuda:1"), "bfloat16")
    assert key == "model.dtype" and why.startswith("GPU cuda:1 (compute capability 7.5)")
    multi = Executor(name="multi", devices=("cuda:0", "cuda:1"))
    assert "GPU cuda:1" in executors.device_problem(multi, "bfloat16")[1]
    assert executors.device_problem(multi, "float16") is None


JOB = {"prompt": "a red house", "model": {"loras": [{"name": "LegoAlrev", "weight": 0.8}]},
       "params": {"sampler": "Euler", "steps": 3, "seed": [11, 12], "width": 64,
                  "height": 64}}


def run_job(folder: Path, **executor) -> int:
    raw = {**JOB, "executor": executor, "run": {"dir": str(folder), "progress": "quiet"}}
    return runner.run(validate(raw), lambda key: "test", [], ["test"])


def pixels(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p)).astype(np.int16)
            for p in sorted((folder / "images").glob("*.png"))]


def test_switches_are_recorded_and_a_resume_or_reproduce_follows_them(tmp_path, monkeypatch):
    from sdbatch import reproduce
    from sdbatch.output import png

    assert run_job(tmp_path / "plain") == 0
    assert run_job(tmp_path / "fused", fuse_loras=True) == 0
    for a, b in zip(pixels(tmp_path / "plain"), pixels(tmp_path / "fused"), strict=True):
        assert diff(a, b) <= 1
    info = json.loads((tmp_path / "fused/run.json").read_text())
    assert info["made_of"]["models"]["tiny"]["switches"] == ["fuse_loras"]
    assert info["switches"] == ["fuse_loras"]
    plain = json.loads((tmp_path / "plain/run.json").read_text())
    assert "switches" not in plain["made_of"]["models"]["tiny"]  # identities as before
    entry = json.loads((tmp_path / "fused/manifest.jsonl").read_text().splitlines()[0])
    assert entry["recipe"]["model"]["switches"] == ["fuse_loras"]

    with pytest.raises(JobError) as e:  # the same run without the switch: other rounding
        run_job(tmp_path / "fused")
    assert "rendered on cpu in float32 with fuse_loras, this session would render on cpu " \
        "in float32," in str(e.value)

    seen = []
    real = reproduce.render_one
    monkeypatch.setattr(reproduce, "render_one", lambda job, *a: seen.append(job.executor)
                        or real(job, *a))
    image = sorted((tmp_path / "fused/images").glob("*.png"))[1]
    assert png.read_recipe(image)["recipe"]["model"]["switches"] == ["fuse_loras"]
    assert reproduce.reproduce(image)
    assert seen[0].fuse_loras


def test_bench_measures_sdbatch_next_to_diffusers(capsys):
    from sdbatch import bench

    bench.main(["--steps", "1", "--repeats", "1", "--batch-size", "1", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "sdbatch bench: tiny, 64x64, 1 steps Euler" in out
    rows = [line.split() for line in out.splitlines() if line.split()[1:2] in (["sdbatch"],
                                                                              ["diffusers"])]
    assert [(r[0], r[1]) for r in rows] == [("1", "sdbatch"), ("1", "diffusers"),
                                           ("2", "sdbatch"), ("2", "diffusers")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and r[5] == "GiB" for r in rows)
    assert out.count("sdbatch / diffusers wall:") == 2


def test_bench_makes_random_weights_in_their_final_dtype(monkeypatch):
    """Each model goes to its dtype while still on meta: SDXL's UNet made in float32 first
    would need ~10 GiB of a 12 GiB card where the float16 stack needs 6.5 GiB."""
    from sdbatch import bench

    made = []
    to_empty = torch.nn.Module.to_empty
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: (
        made.append({p.dtype for p in self.parameters()}), to_empty(self, **kw))[1])
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **kw: self)  # values: moot
    stack = bench.random_stack("sd15", torch.device("cpu"), torch.float16, ())
    assert made and all(dtypes == {torch.float16} for dtypes in made)
    assert stack.pipe.unet.dtype == torch.float16


def test_bench_reads_the_peak_working_set_on_windows(monkeypatch):
    """Windows has neither /proc nor the resource module (an ImportError after the warm-up)."""
    import sys
    from types import SimpleNamespace

    from sdbatch import bench

    fake = SimpleNamespace(Process=lambda: SimpleNamespace(
        memory_info=lambda: SimpleNamespace(peak_wset=123 * 2**20)))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    monkeypatch.setattr(bench.sys, "platform", "win32")
    assert bench._cpu_peak_rss() == 123 * 2**20
