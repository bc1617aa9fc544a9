"""The shipped tiny family draws what the prompt says, measured on pixels.

Each test fails when a wire is crossed: a prompt that does not reach the UNet, a negative
prompt ignored, CFG not applied, the LoRA or the embedding not loaded, a seed not used.
64x64 (the size the family was trained at), DDIM, 20 steps, a few seeds.

Pixels are read the way the training scenes were drawn (sdbatch/tiny_train/scenes.py): the
sky above row 40, a lawn below row 45, the building between; each pixel of the building band
is named by the nearest paint colour, with the sky, lawn, roof and window colours as
alternatives so that background never counts as a wall.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbatch.matrix import Render
from sdbatch.models.stack import StackSpec, load
from sdbatch.models.tiny import family_models, model_folder
from sdbatch.stages import txt2img
from sdbatch.tiny_train.scenes import COLOURS


def txt2img_images(stack, renders, on_step=None):
    """The pictures of a txt2img batch (the stage hands on pictures with their latents)."""
    return [p.image for p in txt2img.run(stack, renders, on_step)]

SEEDS = (1, 2, 3, 4)
BAND = (slice(14, 52), slice(0, 64))  # rows where a building stands
SKY = (slice(0, 9), slice(0, 64))  # above the tallest building
LAWN = (slice(56, 64), slice(0, 64))  # in front of it
BACKGROUND = {"blue sky": (120, 170, 234), "orange sky": (244, 150, 72),
              "night sky": (20, 24, 54), "lawn": (72, 150, 58), "baseplate": (0, 150, 44),
              "roof": (84, 82, 92), "glass": (52, 70, 108)}
PAINT = list(COLOURS)
REFERENCE = np.array([*COLOURS.values(), *BACKGROUND.values()], dtype=float)


def images(stack, prompt: str, negative: str = "", cfg: float = 5.0, seeds=SEEDS):
    renders = tuple(Render(i, 0, "tiny", prompt, negative, "DDIM", "Automatic", 20, cfg, s,
                           64, 64, 1) for i, s in enumerate(seeds))
    return [np.asarray(im, dtype=float) for im in txt2img_images(stack, renders)]


def wall_colours(img: np.ndarray) -> dict[str, int]:
    """How many pixels of the building band each paint colour is the nearest colour of."""
    pixels = img[BAND].reshape(-1, 3)
    nearest = np.abs(pixels[:, None, :] - REFERENCE[None]).sum(-1).argmin(1)
    return {c: int((nearest == i).sum()) for i, c in enumerate(PAINT)}


def share(img: np.ndarray, colour: str) -> float:
    counts = wall_colours(img)
    return counts[colour] / max(1, sum(counts.values()))


@pytest.mark.parametrize("colour", ["red", "blue", "yellow", "white", "purple"])
def test_the_named_colour_dominates_the_building(tiny_stack, colour):
    for img in images(tiny_stack, f"a {colour} house in the centre, lawn, blue sky"):
        counts = wall_colours(img)
        assert max(counts, key=counts.get) == colour, counts


def test_the_negative_prompt_pushes_a_colour_away(tiny_stack):
    """Unnamed, the house takes any colour (purple in about a quarter of these seeds)."""
    prompt, seeds = "a house in the centre, lawn, blue sky", range(1, 17)
    plain = np.mean([share(i, "purple") for i in images(tiny_stack, prompt, seeds=seeds)])
    pushed = np.mean([share(i, "purple") for i in images(tiny_stack, prompt, "purple",
                                                         seeds=seeds)])
    assert pushed < plain - 0.15, (plain, pushed)


def test_cfg_7_follows_the_whole_prompt_and_cfg_1_does_not(tiny_stack):
    """The house's colour is left open and the negative prompt rules purple out. CFG 1 is the
    conditional prediction alone (as in the WebUI): purple houses come as often as without
    the negative prompt, bit for bit the same pictures. CFG 7 steers away from the negative:
    no purple house is left."""
    prompt, seeds = "a house in the centre, lawn, blue sky", range(1, 17)
    loose = images(tiny_stack, prompt, negative="purple", cfg=1.0, seeds=seeds)
    assert all(np.array_equal(a, b) for a, b in
               zip(loose, images(tiny_stack, prompt, cfg=1.0, seeds=seeds), strict=True))
    strict = images(tiny_stack, prompt, negative="purple", cfg=7.0, seeds=seeds)
    assert np.mean([share(i, "purple") for i in loose]) > 0.15
    assert np.mean([share(i, "purple") for i in strict]) < 0.05


def test_a_seed_reproduces_its_picture_and_another_seed_differs(tiny_stack):
    prompt = "a blue house on the left, lawn, orange sky"
    first, again = images(tiny_stack, prompt, seeds=(7, 8)), images(tiny_stack, prompt,
                                                                     seeds=(7, 8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert np.abs(first[0] - first[1]).mean() > 5


def test_legoalrev_makes_the_building_lego(tiny_stack):
    lora = family_models() / "Lora" / "LegoAlrev.safetensors"
    prompt = "LegoAlrev, a red house in the centre, lawn, blue sky"
    none = images(tiny_stack, prompt)
    try:
        tiny_stack.use_networks([(lora, 0.0)], [])
        zero = images(tiny_stack, prompt)
        tiny_stack.use_networks([(lora, 1.0)], [])
        full = images(tiny_stack, prompt)
    finally:
        tiny_stack.use_networks([], [])
    assert all(np.array_equal(a, b) for a, b in zip(none, zero, strict=True))

    def baseplate(img):  # the LoRA's lawn: saturated studded green, far from the base lawn
        lawn = img[LAWN]
        return float((lawn[..., 1] - lawn[..., 0]).mean())

    def studs(img):  # light studs on a dark plate: texture where the base lawn is smooth
        return float(img[LAWN].mean(-1).std())

    def saturation(img):
        return float(np.ptp(img[BAND], axis=-1).mean())

    assert np.mean([baseplate(i) for i in full]) > np.mean([baseplate(i) for i in none]) + 30
    assert np.mean([studs(i) for i in full]) > np.mean([studs(i) for i in none]) + 10
    assert np.mean([saturation(i) for i in full]) > np.mean([saturation(i) for i in none]) + 10


@pytest.fixture(scope="module")
def night_stack(sdbatch_cache):
    """The family with its embedding, loaded the ordinary way (as `model.embeddings` does)."""
    spec = StackSpec("tiny", model_folder(), "auto",
                     embeddings=(family_models() / "embeddings" / "nightsky.pt",))
    return load(spec, torch.device("cpu"))


def test_nightsky_embedding_darkens_the_sky(night_stack):
    def sky(prompt):
        return np.mean([i[SKY].mean() for i in images(night_stack, prompt)])

    assert sky("a red house, lawn, nightsky") < sky("a red house, lawn, blue sky") - 60


def hires_pairs(stack, prompt: str, seeds=SEEDS, denoise: float = 0.45):
    """(hires fix at 128 px, Lanczos x2 of the same first pass) per seed: the first pass at
    64 px, hires fix by Lanczos with 10 steps, as the WebUI's hires fix runs them."""
    from PIL import Image

    from sdbatch import matrix
    from sdbatch.plan import make_plan
    from sdbatch.schema import validate
    from sdbatch.stages import hires_fix
    from sdbatch.stages.common import Item

    job = validate({"prompt": prompt, "params": {
        "sampler": "DDIM", "steps": 20, "cfg_scale": 5, "seed": list(seeds), "width": 64,
        "height": 64}, "post": [{"hires_fix": {"scale": 2, "upscaler": "Lanczos",
                                               "steps": 10, "denoise": denoise}}]})
    renders = matrix.expand(matrix.resolve_seeds(job, 0))
    plan = make_plan(renders, {"tiny": "tiny"}, 1, {}, {})
    bases = txt2img.run(stack, tuple(renders))
    bigs = hires_fix.run(stack, [Item(r, plan.chains[r.index][1].params, base)
                                 for r, base in zip(renders, bases, strict=True)])
    return [(np.asarray(big.image, dtype=float),
             np.asarray(base.image.resize((128, 128), Image.LANCZOS), dtype=float))
            for big, base in zip(bigs, bases, strict=True)]


def high_frequency_energy(img: np.ndarray) -> float:
    """Mean squared Laplacian of the grey image: what a blur takes away."""
    import cv2

    return float((cv2.Laplacian(img.mean(-1), cv2.CV_64F) ** 2).mean())


def test_hires_fix_at_128_is_still_a_red_building_on_a_lawn_and_sharper(tiny_stack):
    """tiny learned 128 px scenes too: hires fix keeps what the first pass drew (a red
    building, a lawn, a blue sky) and adds the detail a Lanczos upscale cannot."""
    pairs = hires_pairs(tiny_stack, "a red building in the centre, lawn, blue sky")
    energies = [(high_frequency_energy(b), high_frequency_energy(lz)) for b, lz in pairs]
    print("hires / lanczos high-frequency energy:", energies)
    for big, lanczos in pairs:
        half = big.reshape(64, 2, 64, 2, 3).mean((1, 3))  # read at the 64 px layout
        counts = wall_colours(half)
        assert max(counts, key=counts.get) == "red", counts
        lawn, sky = half[LAWN].mean((0, 1)), half[SKY].mean((0, 1))
        assert lawn[1] > lawn[0] + 30 and lawn[1] > lawn[2] + 30, lawn
        assert sky[2] > sky[0] + 50, sky
        assert high_frequency_energy(big) > 1.3 * high_frequency_energy(lanczos)
