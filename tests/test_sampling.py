"""Every sampler renders, and renders the same twice; variation seeds and eta reach the image."""

import numpy as np
import pytest
import torch

from sdbatch import samplers
from sdbatch.matrix import Render
from sdbatch.stages import txt2img


def render(**kw) -> Render:
    base = dict(index=0, cell=0, checkpoint="tiny", prompt="a red house", negative_prompt="",
                sampler="Euler", schedule_type="Automatic", steps=3, cfg_scale=5.0, seed=7,
                width=64, height=64, clip_skip=1)
    return Render(**{**base, **kw})


def pixels(stack, *renders) -> list[np.ndarray]:
    return [np.asarray(im, dtype=int) for im in txt2img.run(stack, tuple(renders))]


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_is_reproducible_run_to_run(tiny_stack, name):
    sampler, schedule = samplers.split(name)
    r = render(sampler=sampler, schedule_type=schedule, steps=4 if name == "LCM" else 3)
    [a] = pixels(tiny_stack, r)
    [b] = pixels(tiny_stack, r)
    assert np.array_equal(a, b)


def test_stochastic_samplers_draw_from_the_image_seed(tiny_stack):
    for name in ("Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM2 a"):
        sampler, schedule = samplers.split(name)
        a, b = pixels(tiny_stack, render(sampler=sampler, schedule_type=schedule, seed=1),
                      render(sampler=sampler, schedule_type=schedule, seed=2))
        assert not np.array_equal(a, b), name


def test_variation_seed_moves_the_image_toward_the_subseed(tiny_stack):
    base, full, other, half = pixels(
        tiny_stack, render(seed=1), render(seed=1, subseed=2, subseed_strength=1.0),
        render(seed=2), render(seed=1, subseed=2, subseed_strength=0.5))
    assert np.abs(full - other).max() <= 1
    assert not np.array_equal(half, base) and not np.array_equal(half, other)


def test_eta_changes_ddim(tiny_stack):
    [a] = pixels(tiny_stack, render(sampler="DDIM", schedule_type="Automatic"))
    [b] = pixels(tiny_stack, render(sampler="DDIM", schedule_type="Automatic", eta=1.0))
    assert not np.array_equal(a, b)


def test_ensd_changes_ancestral_noise_only(tiny_stack):
    a, b = pixels(tiny_stack, render(sampler="Euler a"), render(sampler="Euler a", ensd=31337))
    c, d = pixels(tiny_stack, render(sampler="Euler"), render(sampler="Euler", ensd=31337))
    assert not np.array_equal(a, b) and np.array_equal(c, d)


def test_a_long_prompt_beside_a_short_one_changes_nothing(tiny_stack):
    """Each image is conditioned alone: a neighbour's extra chunks are not padded onto it."""
    long = "a red house, " + ", ".join(f"window {i}" for i in range(60))
    [alone] = pixels(tiny_stack, render(prompt="a red house"))
    short, _ = pixels(tiny_stack, render(prompt="a red house"), render(prompt=long, seed=8))
    assert np.abs(alone - short).max() <= 1


def test_prompt_editing_switches_the_prompt_during_sampling(tiny_stack):
    r = dict(steps=6, sampler="Euler")
    blue, switched, never, red_blue, blue_red = pixels(
        tiny_stack, render(prompt="a blue tower", **r),
        render(prompt="[a blue tower:a red house:0]", **r),
        render(prompt="[a blue tower:a red house:100]", **r),
        render(prompt="[a red house|a blue tower]", **r),
        render(prompt="[a blue tower|a red house]", **r))
    assert np.abs(never - blue).max() <= 1  # the switch never comes
    assert np.abs(switched - blue).max() > 3  # red from step 1 on
    assert np.abs(red_blue - blue_red).max() > 3  # alternation: the order matters


def test_prompt_editing_on_sdxl(tmp_path):
    from sdbatch.models.stack import Stack, StackSpec

    from .conftest import build_tiny_sdxl

    pipe = build_tiny_sdxl(tmp_path)
    stack = Stack(StackSpec("xl", tmp_path), pipe, dict(pipe.scheduler.config),
                  torch.device("cpu"), torch.float32)
    r = dict(steps=4, sampler="Euler")
    [plain] = pixels(stack, render(prompt="a red house", **r))
    [edited] = pixels(stack, render(prompt="[a red house:a long blue tower by night:2]", **r))
    assert plain.shape == edited.shape and not np.array_equal(plain, edited)
