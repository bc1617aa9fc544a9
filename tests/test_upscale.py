"""SD upscale, the Extras upscale, seamless tiling and the VAE's tiles on big pictures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sdbatch import matrix, seamless, tiles, upscalers
from sdbatch import run as runner
from sdbatch.models.stack import StackCache
from sdbatch.output import png
from sdbatch.output.infotext import parse_infotext
from sdbatch.plan import make_plan
from sdbatch.schema import JobError, validate
from sdbatch.stages import sd_upscale, txt2img
from sdbatch.stages.common import Item, encode

from .test_post_steps import BASE, counting, entries, image, run_job  # noqa: F401


def webui_positions(size: int, tile: int, overlap: int) -> list[int]:
    """The WebUI's split_grid offsets along one side, written out from its description."""
    cols = -(-(size - overlap) // (tile - overlap))
    dx = (size - tile) / (cols - 1) if cols > 1 else 0
    out = []
    for i in range(cols):
        x = int(i * dx)
        out.append(size - tile if x + tile >= size else x)
    return out


@pytest.mark.parametrize(("size", "tile", "overlap", "expected"), [
    (1024, 512, 64, [0, 256, 512]),  # the seed's x2 of 512: 3 columns
    (2048, 512, 64, [0, 384, 768, 1152, 1536]),
    (1000, 512, 64, [0, 244, 488]),
    (512, 512, 64, [0]),
    (128, 64, 16, [0, 32, 64]),
    (1536, 576, 64, [0, 480, 960]),
    (768, 512, 0, [0, 256]),
    (200, 64, 16, [0, 45, 90, 136]),  # offsets truncated: 45.3, 90.7
])
def test_tile_positions_are_the_webuis(size, tile, overlap, expected):
    assert list(tiles.positions(size, tile, overlap)) == expected
    assert list(tiles.positions(size, tile, overlap)) == webui_positions(size, tile, overlap)
    starts = tiles.positions(size, tile, overlap)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_positions_refuse_a_tile_larger_than_the_picture():
    with pytest.raises(ValueError, match="does not fit"):
        tiles.positions(100, 128, 16)
    with pytest.raises(ValueError, match="overlap"):
        tiles.positions(256, 64, 64)


@pytest.mark.parametrize("overlap", [0, 16, 32])
def test_split_then_blend_gives_the_picture_back(overlap):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (136, 200, 3), dtype=np.uint8))
    grid = tiles.layout(200, 136, 64, 64, overlap)
    assert np.array_equal(np.asarray(tiles.blend(tiles.split(picture, grid), grid)),
                          np.asarray(picture))
    constant = Image.new("RGB", (200, 136), (90, 160, 230))
    assert set(map(tuple, np.asarray(tiles.blend(tiles.split(constant, grid), grid))
                   .reshape(-1, 3))) == {(90, 160, 230)}


def test_blend_ramps_linearly_across_the_overlap():
    """Tiles painted 0, 255 and 0 again: the overlaps are gradients, the rest flat."""
    grid = tiles.layout(128, 64, 64, 64, 16)  # columns at 0, 32, 64
    painted = [Image.new("RGB", (64, 64), (v, v, v)) for v in (0, 255, 0)]
    row = np.asarray(tiles.blend(painted, grid))[10, :, 0].astype(int)
    rise = row[32:48]
    assert rise[0] == 0 and list(rise) == sorted(rise) and rise[-1] >= 230
    assert np.allclose(np.diff(rise), 255 / 16, atol=1.01)
    assert (row[48:64] == 255).all() and (row[:32] == 0).all()
    assert list(row[64:80]) == sorted(row[64:80], reverse=True)
    grid = tiles.layout(64, 128, 64, 64, 16)  # rows blend the same way, downwards
    column = np.asarray(tiles.blend(painted, grid))[:, 5, 0].astype(int)
    assert list(column[32:48]) == sorted(column[32:48]) and column[47] >= 230


def test_tile_seeds_are_the_webuis_batches():
    def seeds(count, batch_size, variation=False):
        return [s for s, _ in tiles.tile_seeds(10, 50, count, batch_size, variation)]

    assert seeds(5, 1) == [10, 11, 12, 13, 14]
    # batches of 2: (10, 11), then one above the previous batch's first seed: (11, 12), ...
    assert seeds(5, 2) == [10, 11, 11, 12, 12]
    assert {sub for _, sub in tiles.tile_seeds(10, 50, 5, 2, False)} == {50}
    # with variation a batch keeps its seed and counts the variation seed up, per batch
    assert tiles.tile_seeds(10, 50, 5, 2, True) == [(10, 50), (10, 51), (11, 50), (11, 51),
                                                    (12, 50)]
    assert tiles.tile_seeds(10, 50, 3, 1, True) == [(10, 50), (11, 50), (12, 50)]


def test_an_upscale_to_a_smaller_size_runs_no_upscaler_pass():
    """The WebUI's loop checks the size first: a scale below 1 is one Lanczos resize, the
    model never runs (it ran, 4x up and back down)."""
    from PIL import Image

    picture = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    calls = []

    def model(im):
        calls.append(im.size)
        return im.resize((im.width * 4, im.height * 4))

    small = upscalers.upscale(picture, 0.5, "R-ESRGAN 4x+", model)
    assert calls == [] and small.size == (32, 24)
    assert np.array_equal(np.asarray(small), np.asarray(
        picture.resize((32, 24), Image.Resampling.LANCZOS)))
    assert np.array_equal(np.asarray(upscalers.upscale(picture, 0.5, "Lanczos")),
                          np.asarray(small))
    upscalers.upscale(picture, 2, "R-ESRGAN 4x+", model)
    assert calls == [(64, 48)]  # up: one pass of the model, then down to the target


def test_upscaled_sizes_are_the_webuis_multiples_of_8():
    assert upscalers.scaled_size(64, 64, 2) == (128, 128)
    assert upscalers.scaled_size(100, 60, 1.5) == (144, 88)
    out = upscalers.upscale(Image.new("RGB", (100, 60)), 1.5, "Lanczos")
    assert out.size == (144, 88)


def test_bad_upscale_settings_are_refused_up_front(tmp_path):
    with pytest.raises(JobError, match=r"sd_upscale.upscaler.*'Latent' upscales latents"):
        validate({**BASE, "post": [{"sd_upscale": {"upscaler": "Latent"}}]})
    for step in ("upscale", "hires_fix", "sd_upscale"):  # it would fail mid-run
        with pytest.raises(JobError, match=rf"{step}.upscaler.*'None' does not upscale"):
            validate({**BASE, "post": [{step: {"upscaler": "None"}}]})
    validate({**BASE, "post": [{"upscale": {"upscaler_2": "None"}}]})  # no second one
    with pytest.raises(JobError, match=r"upscale.resize_x.*both"):
        validate({**BASE, "post": [{"upscale": {"resize_x": 256}}]})
    job = {**BASE, "post": [{"sd_upscale": {"scale": 1, "width": 128}}],
           "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError, match=r"post\[0\].sd_upscale.*128x64 tiles.*64x64"):
        runner.prepare(validate(job), lambda key: "test")
    job["post"] = [{"sd_upscale": {"tile_overlap": 64}}]
    with pytest.raises(JobError, match=r"tile_overlap 64 must be less"):
        runner.prepare(validate(job), lambda key: "test")
    assert validate({**BASE, "params": {"tiling": [True, "x"]}}).params.tiling == ("true", "x")


def test_sd_upscale_worked_example_and_a_grid_runs_its_base_once(tmp_path, counting):  # noqa: F811
    """The seed's example scaled down: x2, denoise 0.4, tiles of the processing size (64)
    with overlaps 16 and 32; then the Extras upscale with a second upscaler blended in."""
    job = {**BASE, "post": [{"sd_upscale": {"scale": 2, "tile_overlap": [16, 32],
                                            "denoise": 0.4}},
                            {"upscale": {"scale": 1.5, "upscaler_2": "Nearest",
                                         "upscaler_2_visibility": 0.3}}]}
    assert run_job(job, tmp_path / "r") == 0
    assert counting == {"txt2img": 1, "sd_upscale": 2, "upscale": 2}
    done = entries(tmp_path / "r")
    pictures = [image(tmp_path / "r", e) for e in done]
    assert [p.shape for p in pictures] == [(192, 192, 3)] * 2
    assert not np.array_equal(pictures[0], pictures[1])
    text = png.read_text(tmp_path / "r" / done[1]["file"])["parameters"]
    _, _, params = parse_infotext(text)
    assert (params["SD upscale overlap"], params["SD upscale upscaler"],
            params["Denoising strength"], params["Postprocess upscale by"],
            params["Postprocess upscaler"], params["Postprocess upscaler 2"],
            params["Postprocess upscaler 2 visibility"]) == \
        ("32", "Lanczos", "0.4", "1.5", "Lanczos", "Nearest", "0.3")
    assert "Tiling" not in params
    stages = done[0]["recipe"]["stages"]
    assert [s["kind"] for s in stages] == ["txt2img", "sd_upscale", "upscale"]
    assert stages[1]["params"]["output_size"] == [128, 128]


def test_sd_upscale_samples_batch_size_tiles_per_pass_with_their_seeds(
        tiny_stack, monkeypatch):
    job = validate({**BASE, "params": {**BASE["params"], "batch_size": 4},
                    "post": [{"sd_upscale": {"tile_overlap": 16}}]})
    renders = matrix.expand(matrix.resolve_seeds(job, 0))
    plan = make_plan(renders[:1], {"tiny": "t"}, 1)
    source = txt2img.run(tiny_stack, (renders[0],))[0]
    passes, subseeds = [], []
    real = sd_upscale.sample_tail

    def spy(stack, rs, latents, tail, on_step=None):
        passes.append(([r.seed for r in rs], tuple(latents.shape)))
        subseeds.append([r.subseed for r in rs])
        return real(stack, rs, latents, tail, on_step)

    monkeypatch.setattr(sd_upscale, "sample_tail", spy)
    item = Item(renders[0], plan.chains[0][1].params, source)
    [out] = sd_upscale.run(tiny_stack, [item])
    assert out.image.size == (128, 128)
    assert [len(s) for s, _ in passes] == [4, 4, 1]  # 9 tiles, 4 per forward pass
    assert passes[0][1] == (4, 4, 8, 8)  # each pass holds its own tiles only
    assert [s for seeds, _ in passes for s in seeds] == [3, 4, 5, 6, 4, 5, 6, 7, 5]
    # with a variation strength the seed stays in a pass and the variation seeds count up
    varied = dataclasses.replace(item, params={**item.params, "subseed": 20,
                                               "subseed_strength": 0.5})
    passes.clear()
    subseeds.clear()
    sd_upscale.run(tiny_stack, [varied])
    assert [seeds for seeds, _ in passes] == [[3] * 4, [4] * 4, [5]]
    assert subseeds == [[20, 21, 22, 23]] * 2 + [[20]]
    flat = dataclasses.replace(item, params={**item.params, "denoise": 0.0})
    [same] = sd_upscale.run(tiny_stack, [flat])
    assert np.array_equal(np.asarray(same.image),
                          np.asarray(upscalers.upscale(source.image, 2, "Lanczos")))


def seam(picture: np.ndarray, axis: int) -> float:
    """The step from the last column (axis 1) or row (axis 0) back to the first, relative
    to the mean step between neighbours inside the picture: about 1 where it wraps."""
    a = picture.astype(float)
    last, first = np.take(a, -1, axis=axis), np.take(a, 0, axis=axis)
    return float(np.abs(last - first).mean() / np.abs(np.diff(a, axis=axis)).mean())


def test_tiling_wraps_the_picture_and_the_stack_is_restored(tmp_path):
    job = {**BASE, "params": {**BASE["params"], "tiling": ["true", "false"]}}
    assert run_job(job, tmp_path / "both") == 0
    tiled, untiled = entries(tmp_path / "both")
    job = {**BASE, "params": {**BASE["params"], "tiling": "false"}}
    assert run_job(job, tmp_path / "fresh") == 0
    [fresh] = entries(tmp_path / "fresh")
    a, b = image(tmp_path / "both", tiled), image(tmp_path / "both", untiled)
    assert np.array_equal(b, image(tmp_path / "fresh", fresh))  # pixels: the PNGs' jobs differ
    assert seam(a, 1) < 2 and seam(a, 0) < 2  # about 1 (1.56 measured); untiled: over 5
    assert seam(b, 0) > 5  # untiled, tiny's sky does not continue into its lawn
    text = png.read_text(tmp_path / "both" / tiled["file"])["parameters"]
    assert parse_infotext(text)[2]["Tiling"] == "True"


def test_tiling_x_wraps_only_across(tiny_stack):
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, :, 0] = 1  # a line down the left edge
    x[0, 0, 0, :] = 1  # and one along the top
    with seamless.tiling([conv], "x"):
        wrapped = conv(x)
    plain = conv(x)
    assert wrapped[0, 0, 1, 3] > plain[0, 0, 1, 3]  # the left edge reaches the right
    assert torch.equal(wrapped[0, 0, 3, 1:3], plain[0, 0, 3, 1:3])  # the top does not wrap
    assert "_conv_forward" not in vars(conv)


def test_the_vae_tiles_pictures_over_the_threshold(tiny_stack, monkeypatch):
    vae = tiny_stack.pipe.vae
    calls = []
    real, real_encode = vae.tiled_decode, vae._tiled_encode
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(vae, "_tiled_encode",
                        lambda *a, **k: calls.append(2) or real_encode(*a, **k))
    latents = torch.zeros(1, vae.config.latent_channels, 16, 16)  # 128 px
    try:
        seamless.vae_tiles(vae, 128)
        txt2img.decode(tiny_stack.pipe, latents)
        assert calls == []
        seamless.vae_tiles(vae, 64)
        [picture] = txt2img.decode(tiny_stack.pipe, latents)
        assert calls == [1] and picture.size == (128, 128)
        assert encode(tiny_stack.pipe, [picture], tiny_stack.device).shape[-1] == 16
        assert calls == [1, 2]
    finally:
        seamless.vae_tiles(vae, 1024)


def test_the_vae_tile_setting_keys_only_the_calls_it_can_change():
    """A call whose picture (in or out) has a side over executor.vae_tile_px records it in
    its params and key; a smaller one does not depend on it."""
    job = validate({**BASE, "post": [{"hires_fix": {"scale": 2, "steps": 2}}]})
    [render] = matrix.expand(matrix.resolve_seeds(job, 0))

    def calls(px):
        return make_plan([render], {"tiny": "s"}, 8, vae_tile_px=px).chains[0]

    txt, hires = calls(96)  # 64 px drawn, 128 px hires-fixed
    assert "vae_tile_px" not in txt.params and hires.params["vae_tile_px"] == 96
    assert calls(64)[0].key == calls(1024)[0].key == txt.key  # 64 px is not over 64
    assert calls(64)[1].key != hires.key and calls(1024)[1].key != hires.key
    assert "vae_tile_px" not in calls(1024)[1].params


def test_a_run_records_its_vae_tiles_resume_refuses_others_reproduce_follows(tmp_path):
    from sdbatch.reproduce import reproduce

    job = {**BASE, "params": {**BASE["params"], "width": 128, "steps": 3},
           "executor": {"vae_tile_px": 64}}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    assert entry["recipe"]["stages"][0]["params"]["vae_tile_px"] == 64
    whole = {**job, "executor": {"vae_tile_px": 1024}}
    assert run_job(whole, tmp_path / "w") == 0
    assert not np.array_equal(image(tmp_path / "r", entry),
                              image(tmp_path / "w", entries(tmp_path / "w")[0]))
    with pytest.raises(JobError, match=r"txt2img\.vae_tile_px"):
        run_job(whole, tmp_path / "r")
    assert reproduce(tmp_path / "r" / entry["file"])  # with 64 px tiles, as recorded


def test_upscale_alone_loads_no_model(tmp_path, monkeypatch):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(source)

    def no_model(*a, **k):
        raise AssertionError("an upscale must not load a model")

    monkeypatch.setattr(StackCache, "get", no_model)
    job = {**BASE, "init_image": str(source),
           "post": [{"upscale": {"resize_x": 128, "resize_y": 128, "upscaler": "Nearest"}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    assert image(tmp_path / "r", entry).shape == (128, 128, 3)
    params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])["parameters"])[2]
    assert params["Postprocess upscale to"] == "128x128"
    assert params["Postprocess crop to"] == "128x128"  # the WebUI's key: the size cropped to
    assert not {"Steps", "Sampler", "Seed", "Model", "Size"} & set(params)  # no model ran



def test_reproduce_renders_a_tiled_sd_upscale_chain_again(tmp_path):
    from sdbatch.reproduce import reproduce

    job = {**BASE, "params": {**BASE["params"], "seed": [3, 4], "tiling": "x"},
           "post": [{"sd_upscale": {"tile_overlap": 16, "steps": 4}}]}
    assert run_job(job, tmp_path / "r") == 0
    assert reproduce(tmp_path / "r" / entries(tmp_path / "r")[1]["file"])
