"""The post-steps' pure maths against numbers worked out by hand from the WebUI's rules:
resize modes, hires size, only-masked crop box, mask blur, img2img step counts, compositing."""

import numpy as np
import pytest
from PIL import Image

from sdbatch import denoise_steps, images, masks
from sdbatch.images import Placement


@pytest.mark.parametrize("mode, src, dst, want", [
    ("just_resize", (100, 50), (64, 64), Placement(64, 64, 0, 0)),
    # cover 64x64 from 2:1: height fills, width overhangs 128 -> pasted at -32
    ("crop_and_resize", (100, 50), (64, 64), Placement(128, 64, -32, 0)),
    ("crop_and_resize", (50, 100), (64, 64), Placement(64, 128, 0, -32)),
    # fit 2:1 inside 64x64: width fills, 32 high, centred at y 16
    ("resize_and_fill", (100, 50), (64, 64), Placement(64, 32, 0, 16)),
    ("resize_and_fill", (50, 100), (64, 64), Placement(32, 64, 16, 0)),
    ("resize_and_fill", (64, 64), (128, 128), Placement(128, 128, 0, 0)),
    ("crop_and_resize", (640, 480), (512, 512), Placement(682, 512, -85, 0)),
])
def test_resize_mode_geometry(mode, src, dst, want):
    assert images.placement(mode, src, dst) == want


def test_resize_and_fill_stretches_the_edge_rows_into_the_bands():
    a = np.zeros((10, 20, 3), np.uint8)
    a[0] = (255, 0, 0)  # top row red, bottom row blue
    a[-1] = (0, 0, 255)
    out = np.asarray(images.resize(Image.fromarray(a), "resize_and_fill", 40, 40))
    assert out.shape == (40, 40, 3)
    assert out[0, 20, 0] > 200 and out[0, 20, 2] < 50  # the top band carries the top row
    assert out[-1, 20, 2] > 200 and out[-1, 20, 0] < 50


@pytest.mark.parametrize("args, want", [
    ((512, 512, 2.0), (1024, 1024, 0, 0)),
    ((64, 64, 1.5), (96, 96, 0, 0)),
    ((512, 768, None, 1024, 0), (1024, 1536, 0, 0)),      # one side: keep the aspect
    ((512, 768, None, 0, 1024), (682, 1024, 0, 0)),
    # both: 512x768 covering 1024x1024 -> 1024x1536, 512 px = 64 cells too tall
    ((512, 768, None, 1024, 1024), (1024, 1536, 0, 64)),
    ((768, 512, None, 1024, 1024), (1536, 1024, 64, 0)),
    # a cover that is no multiple of 8: 640x896 -> 1024x1433 (179 latent rows), 51 cropped
    ((640, 896, None, 1024, 1024), (1024, 1433, 0, 51)),
    ((576, 832, None, 1024, 1024), (1024, 1479, 0, 56)),
    # a cover 1 px over its box: no cell cropped, and the WebUI's 179 rows are 1432 px
    ((640, 896, None, 1024, 1432), (1024, 1433, 0, 0)),
])
def test_hires_size(args, want):
    s = images.hires_size(*args)
    assert (s.width, s.height, s.truncate_x, s.truncate_y) == want
    if args[3:] and all(args[3:]):
        assert s.final == args[3:]
    elif args[2] is not None:
        assert s.final == (s.width, s.height)  # a scale's target as it is: 83 px stays 83


@pytest.mark.parametrize("steps, denoise, schedule, run", [
    (20, 0.75, 20, 16),  # t_enc 15 -> sigmas[4:] -> 16 steps
    (20, 1.0, 20, 20),
    (20, 0.5, 20, 11),
    (20, 0.01, 20, 1),
    (20, 0.0, 20, 0),
    (30, 0.3, 30, 10),
])
def test_img2img_step_counts(steps, denoise, schedule, run):
    t = denoise_steps.img2img(steps, denoise)
    assert (t.schedule, t.run, t.start) == (schedule, run, schedule - run)


@pytest.mark.parametrize("steps, denoise, schedule", [
    (10, 0.5, 20), (10, 0.3, 33), (10, 1.0, 10), (20, 0.45, 44)])
def test_hires_runs_exactly_its_steps_as_a_schedule_tail(steps, denoise, schedule):
    t = denoise_steps.exact(steps, denoise)
    assert (t.schedule, t.run) == (schedule, steps)


def square(h, w, box):
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return m


def test_crop_box_pads_then_grows_the_short_side_to_the_aspect():
    m = square(128, 128, (40, 60, 60, 70))  # 20 x 10 box
    assert masks.bbox(m) == (40, 60, 60, 70)
    # padding 4 -> (36, 56, 64, 74): 28 x 18; square processing -> height grows by 10
    assert masks.crop_box(m, 4, 64, 64) == (36, 51, 64, 79)
    # 2:1 processing: 28 x 18 is narrower than 2:1 -> width grows to 36
    assert masks.crop_box(m, 4, 128, 64) == (32, 56, 68, 74)


def test_crop_box_is_shifted_inside_the_image_at_the_borders():
    m = square(64, 64, (0, 0, 30, 6))  # wide box at the top-left corner
    x1, y1, x2, y2 = masks.crop_box(m, 0, 64, 64)
    assert (x1, y1, x2, y2) == (0, 0, 30, 30)  # grown downward only: shifted to y 0
    m = square(64, 64, (10, 58, 40, 64))  # at the bottom edge
    assert masks.crop_box(m, 0, 64, 64) == (10, 34, 40, 64)
    m = square(32, 64, (0, 0, 8, 32))  # tall box, wide processing, image too narrow? no: clip
    assert masks.crop_box(m, 0, 256, 32) == (0, 0, 64, 32)


def test_crop_box_of_an_empty_mask_is_none():
    assert masks.crop_box(np.zeros((8, 8), np.uint8), 4, 64, 64) is None


def test_mask_blur_profile():
    m = np.zeros((1, 101), np.uint8)
    m[0, 50:] = 255
    out = masks.blur(m, 4, 0)[0].astype(int)
    assert masks.kernel_size(4) == 21
    # untouched beyond the kernel's reach (10 px), a monotone ramp across the edge
    assert (out[:40] == 0).all() and (out[61:] == 255).all()
    assert all(a <= b for a, b in zip(out, out[1:], strict=False))
    # a Gaussian with sigma 4: the edge pixel holds half the step plus half a pixel's weight
    assert abs(out[49] + out[50] - 255) <= 1
    assert 0 < out[45] < 40 < out[48] < 128
    two_d = masks.blur(square(64, 64, (20, 20, 44, 44)), 4)
    assert two_d[32, 9] == 0 and two_d[9, 32] == 0 and two_d[32, 32] == 255
    assert 0 < two_d[32, 20] < 255 and 0 < two_d[20, 32] < 255  # blurred in x and in y
    assert np.array_equal(masks.blur(m, 0, 0), m)


def test_overlay_mask_doubles_for_the_whole_picture():
    m = np.array([[0, 64, 127, 128, 255]], np.uint8)
    assert masks.overlay_mask(m, False).tolist() == [[0, 128, 254, 255, 255]]
    assert masks.overlay_mask(m, True).tolist() == m.tolist()


def test_composite_keeps_the_original_bytes_where_the_mask_is_zero():
    rng = np.random.default_rng(0)
    old = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    new = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    mask[3, 3:13] = 100
    out = np.asarray(images.composite(old, new, mask))
    assert np.array_equal(out[mask == 0], np.asarray(old)[mask == 0])
    assert np.array_equal(out[mask == 255], np.asarray(new)[mask == 255])
    mid = out[3, 5].astype(int)
    n, o = np.asarray(new, float)[3, 5], np.asarray(old, float)[3, 5]
    want = np.rint(n * 100 / 255 + o * 155 / 255)
    assert np.abs(mid - want).max() <= 1


def test_latent_mask_is_rounded_at_latent_size():
    m = square(64, 64, (0, 0, 32, 64))
    lm = masks.latent_mask(m, 8, 8)
    assert lm.shape == (8, 8) and set(np.unique(lm)) == {0.0, 1.0}
    assert lm[:, :4].min() == 1 and lm[:, 4:].max() == 0


def test_fill_paints_the_hole_with_the_colours_around_it():
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = (200, 0, 0)
    a[:, 16:] = (0, 0, 200)
    hole = square(32, 32, (8, 8, 24, 24))
    a[8:24, 8:24] = (0, 255, 0)  # what is under the mask must not leak into the fill
    out = np.asarray(masks.fill(Image.fromarray(a), hole)).astype(int)
    assert out[16, 10, 1] < 30 and out[16, 10, 0] > out[16, 10, 2]
    assert out[16, 21, 2] > out[16, 21, 0]


def test_read_mask_alpha_and_grey(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[1:3, 1:3, 3] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert masks.read_mask(tmp_path / "a.png").tolist() == square(4, 4, (1, 1, 3, 3)).tolist()
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(tmp_path / "g.png")
    assert (masks.read_mask(tmp_path / "g.png") == 77).all()


def test_read_image_applies_exif_rotation_and_flattens_alpha(tmp_path):
    a = np.zeros((2, 4, 4), np.uint8)  # 4 wide, 2 high, transparent
    a[..., 0] = 255
    im = Image.fromarray(a, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.png", exif=exif)
    out = images.read_image(tmp_path / "r.png")
    assert out.mode == "RGB" and out.size == (2, 4)
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    sixteen = Image.fromarray(np.full((3, 3), 65535, np.uint16))
    sixteen.save(tmp_path / "s.png")
    assert np.asarray(images.read_image(tmp_path / "s.png")).min() == 255
    Image.new("CMYK", (3, 3), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    assert images.read_image(tmp_path / "c.jpg").mode == "RGB"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(images.ImageFileError, match="bad.png"):
        images.read_image(tmp_path / "bad.png")


def test_decoded_pixels_are_truncated_as_the_webui_does():
    """255 * clamp((x + 1) / 2) cast to uint8: 0.5019 is 127 (128 rounded), 0.999 is 254."""
    import torch

    from sdbatch.stages.vae import to_pil

    levels = torch.tensor([-1.5, -1.0, 0.0038, 0.998, 1.0, 2.0])  # (x + 1) / 2: .5019, .999
    [picture] = to_pil(levels.view(1, 1, 1, 6).expand(1, 3, 1, 6))
    assert np.asarray(picture)[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
