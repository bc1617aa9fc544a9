"""The stack cache: executor.stack_cache_gb keeps stacks beyond the one in use, and a stack
that is not kept is released before the next one loads (counted loads and evictions)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdbatch import run as runner
from sdbatch.models import stack as stacks
from sdbatch.models.ldm_export import save_single_file
from sdbatch.models.stack import StackCache
from sdbatch.schema import validate

GIB = 2**30


class Loader:
    """Fake stacks of given sizes; records which stacks the cache still held at each load."""

    def __init__(self, cache_of, sizes: dict[str, float]):
        self.cache_of, self.sizes, self.held_at_load = cache_of, sizes, []

    def __call__(self, spec, device):
        self.held_at_load.append(sorted(self.cache_of().stacks))
        size = int(self.sizes[spec.identity] * GIB)
        return SimpleNamespace(spec=spec, nbytes=lambda: size)


def cache_with(budget_gb: float, sizes: dict[str, float]) -> tuple[StackCache, Loader]:
    cache = None
    loader = Loader(lambda: cache, sizes)
    cache = StackCache(torch.device("cpu"), budget_gb, loader)
    return cache, loader


def use(cache: StackCache, *names: str) -> None:
    for name in names:
        cache.get(SimpleNamespace(identity=name, path=Path(name)))


def test_budget_zero_releases_the_old_stack_before_the_next_loads():
    cache, loader = cache_with(0, {"a": 0.5, "b": 0.5})
    use(cache, "a", "b", "a")
    assert (cache.loads, cache.evictions) == (3, 2)
    assert loader.held_at_load == [[], [], []]


def test_the_budget_counts_only_stacks_beyond_the_one_in_use():
    cache, loader = cache_with(1.0, {"a": 0.6, "b": 0.6, "c": 0.6})
    use(cache, "a", "b", "a")  # a (0.6 GiB) fits the budget beside b in use: kept
    assert (cache.loads, cache.evictions) == (2, 0)
    use(cache, "c")  # a and b (1.2 GiB) would exceed it beside c: b, least recent, goes
    assert (cache.loads, cache.evictions) == (3, 1)
    assert loader.held_at_load == [[], ["a"], ["a"]]
    assert list(cache.stacks) == ["a", "c"]


def test_a_stack_bigger_than_the_budget_is_still_used():
    cache, _ = cache_with(0.5, {"a": 2.0, "b": 0.1})
    use(cache, "a", "a", "b")
    assert (cache.loads, cache.evictions) == (2, 1)


def test_checkpoint_axis_frees_the_first_stack_before_loading_the_second(tmp_path, tiny_stack,
                                                                        tiny_spec, monkeypatch):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    save_single_file(tiny_stack.pipe, models / "Stable-diffusion" / "copy.safetensors")
    pipes: list[weakref.ref] = []
    alive_at_load = []
    real = stacks.load

    def load(spec, device):
        gc.collect()
        alive_at_load.append(sum(p() is not None for p in pipes))
        stack = real(spec, device)
        pipes.append(weakref.ref(stack.pipe))
        return stack

    monkeypatch.setattr(stacks, "load", load)
    raw = {"prompt": "a house", "paths": {"models": str(models)},
           "params": {"sampler": "Euler", "steps": 2, "seed": [1, 2], "width": 64, "height": 64},
           "model": {"checkpoint": ["tiny", "copy"], "config": str(tiny_spec.path)},
           "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
    entries = [json.loads(x) for x in (tmp_path / "r" / "manifest.jsonl").read_text().splitlines()]
    assert [e["recipe"]["model"]["name"] for e in entries] == ["tiny", "tiny", "copy", "copy"]
    assert alive_at_load == [0, 0]



def test_each_checkpoint_is_checked_against_the_loras_its_own_images_apply(
        tmp_path, tiny_stack, tiny_spec, monkeypatch):
    """A LoRA zipped with one checkpoint is not checked against the other (which may be of
    another family: an SDXL LoRA next to an SDXL checkpoint in a job that also has SD1.5)."""
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    save_single_file(tiny_stack.pipe, models / "Stable-diffusion" / "copy.safetensors")
    checked: dict[str, list[str]] = {}
    real = stacks.Stack.check_loras

    def check(stack, paths):
        checked[stack.spec.identity] = [Path(p).stem for p in paths]
        return real(stack, paths)

    monkeypatch.setattr(stacks.Stack, "check_loras", check)
    raw = {"prompt": ["a house <lora:LegoAlrev:1>", "a house"],
           "paths": {"models": str(models)}, "zip": [["model.checkpoint", "prompt"]],
           "params": {"sampler": "Euler", "steps": 2, "seed": 1, "width": 64, "height": 64},
           "model": {"checkpoint": ["tiny", "copy"], "config": str(tiny_spec.path)},
           "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
    assert sorted(checked.values()) == [[], ["LegoAlrev"]]


def test_a_cut_short_lora_is_a_problem_of_the_job_not_a_traceback(tmp_path, tiny_spec):
    from sdbatch.models import tiny
    from sdbatch.run import JobError

    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    whole = (tiny.family_models() / "Lora" / "LegoAlrev.safetensors").read_bytes()
    (folder / "broken.safetensors").write_bytes(whole[:len(whole) // 2])
    raw = {"prompt": "a house <lora:broken:1>", "paths": {"models": str(tmp_path / "models")},
           "params": {"sampler": "Euler", "steps": 2, "seed": 1, "width": 64, "height": 64},
           "model": {"checkpoint": "tiny", "config": str(tiny_spec.path)},
           "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
    with pytest.raises(JobError, match=r"broken\.safetensors.*download it again"):
        runner.run(validate(raw), lambda key: "test", [], ["test"])
    assert not (tmp_path / "r").exists()
