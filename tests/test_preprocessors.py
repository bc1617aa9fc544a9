"""ControlNet preprocessors and control-map geometry (sdbatch.preprocessors): pure functions,
checked against the sd-webui-controlnet extension's formulas."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sdbatch import preprocessor_names, preprocessors
from sdbatch.tiny_train import scenes


def picture(w: int = 96, h: int = 64, seed: int = 3) -> np.ndarray:
    """A toy scene (hard edges, flat colours) cut to w x h."""
    img = scenes.draw(scenes.Scene(seed=seed, position="left"), max(w, h)).image
    return np.ascontiguousarray(img[:h, :w])


def test_canny_is_cv2_canny_on_the_picture_scaled_to_processor_res():
    img = picture()
    for res, low, high in ((64, 100, 200), (128, 50, 120)):
        padded, (h, w) = preprocessors.resize_with_pad(img, res)
        assert min(h, w) == res and padded.shape[0] % 64 == 0 and padded.shape[1] % 64 == 0
        want = cv2.Canny(padded, low, high)[:h, :w]
        got = preprocessors.run("canny", img, res, low, high)
        assert got.shape == (h, w, 3) and got.dtype == np.uint8
        assert np.array_equal(got[:, :, 0], want) and np.array_equal(got[:, :, 2], want)
        assert set(np.unique(got)) <= {0, 255} and got.max() == 255


def test_canny_defaults_are_the_extensions():
    assert preprocessor_names.thresholds("canny", None, None) == (100.0, 200.0)
    assert preprocessor_names.thresholds("canny", 50, None) == (50.0, 200.0)
    assert preprocessor_names.thresholds("none", 3, 4) == (0.5, 0.5)  # hidden sliders


@pytest.mark.parametrize("name", list(preprocessor_names.PREPROCESSORS))
def test_every_preprocessor_gives_an_rgb_uint8_map(name):
    img = picture()
    a, b = preprocessor_names.thresholds(name, None, None)
    out = preprocessors.run(name, img, 64, a, b)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if preprocessor_names.PREPROCESSORS[name].uses_resolution:
        assert min(out.shape[:2]) == 64 and out.shape[1] / out.shape[0] == pytest.approx(1.5)
    elif name != "tile_resample":
        assert out.shape[:2] == img.shape[:2]


def test_each_preprocessor_does_what_it_says():
    img = picture()
    assert np.array_equal(preprocessors.run("none", img, 512, 0.5, 0.5), img)
    assert np.array_equal(preprocessors.run("invert", img, 512, 0.5, 0.5), 255 - img)
    binary = preprocessors.run("threshold", img, 64, 127, 0.5)
    assert set(np.unique(binary)) <= {0, 255}
    grey = preprocessors.run("brightness", img, 512, 1.0, 0.5)
    assert np.array_equal(grey[:, :, 0], grey[:, :, 1]) and grey.std() > 10
    small = preprocessors.run("tile", img, 512, 2.0, 0.5)
    assert small.shape == (32, 48, 3)
    assert np.array_equal(preprocessors.run("tile", img, 512, 1.0, 0.5), img)
    lines = preprocessors.run("lineart_standard", img, 64, 0.5, 0.5)
    assert lines.max() > 100 and (lines > 0).mean() < 0.5  # lines, not a picture
    scribble = preprocessors.run("scribble", img, 64, 32, 0.5)
    assert set(np.unique(scribble)) <= {0, 255}


def test_a_preprocessor_that_needs_a_model_is_refused_with_the_fix():
    for name in ("depth_midas", "openpose_full", "lineart_realistic", "hed"):
        msg = preprocessor_names.check(name)
        assert "preprocessor: none" in msg and "elsewhere" in msg
    assert "lineart_standard" in preprocessor_names.check("lineart")
    assert "must be one of" in preprocessor_names.check("cany")
    assert preprocessor_names.check("tile") is None
    assert preprocessor_names.canonical("brightness") == "recolor_luminance"


def test_pixel_perfect_is_the_extensions_formula():
    # 1000 x 500 picture onto 512 x 512: covering it needs a short side of 512 (x1.024);
    # fitting inside needs 256
    assert preprocessor_names.pixel_perfect_resolution(1000, 500, 512, 512,
                                                       "crop_and_resize") == 512
    assert preprocessor_names.pixel_perfect_resolution(1000, 500, 512, 512,
                                                       "resize_and_fill") == 256
    assert preprocessor_names.pixel_perfect_resolution(64, 64, 128, 96, "just_resize") == 128


def test_resize_modes_fit_the_stage():
    img = picture(96, 64)
    for mode in ("just_resize", "crop_and_resize", "resize_and_fill"):
        assert preprocessors.fit(img, mode, 64, 64).shape == (64, 64, 3)
    cropped = preprocessors.fit(img, "crop_and_resize", 64, 64)
    assert np.array_equal(cropped, img[:, 16:80])  # the centre, not squeezed
    filled = preprocessors.fit(img, "resize_and_fill", 96, 96)
    assert np.array_equal(filled[16:80], img)  # fitted inside, bands above and below
    edges = preprocessors.run("canny", picture(), 64, 100, 200)
    big = preprocessors.fit(edges, "just_resize", 192, 128)
    assert set(np.unique(big)) <= {0, 255}  # a binary map stays binary


def test_soft_injection_factors():
    assert preprocessors.control_scales(0.5, 13, False) == [0.5] * 13
    soft = preprocessors.control_scales(2.0, 13, True)
    assert soft[12] == 2.0 and soft[0] == pytest.approx(2.0 * 0.825 ** 12)
    assert preprocessors.control_scales(1.0, 10, True)[-1] == pytest.approx(0.825 ** 3)
