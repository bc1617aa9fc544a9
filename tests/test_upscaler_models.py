"""Upscaler model files through spandrel: names as the WebUI's, the pickle rule, tiled
inference, and the steps that use them (hires fix, SD upscale, the Extras upscale).

The models are spandrel architectures built here with random weights (no downloads)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sdbatch import run as runner
from sdbatch import tiles, upscalers
from sdbatch.models import names, spandrel_files, upscaler_models
from sdbatch.models.single_file import ModelFileError
from sdbatch.output import png
from sdbatch.output.infotext import parse_infotext
from sdbatch.schema import JobError, validate

from .test_post_steps import BASE, entries, image, run_job


def esrgan(scale: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ESRGAN (RRDBNet: 8 filters, one block) with random weights."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).state_dict()


def compact(scale: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Real-ESRGAN Compact (SRVGG): three 3x3 convolutions, so a receptive field of
    3 px around each input pixel."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=1, upscale=scale,
                   act_type="prelu").state_dict()


def put(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colours with some edges: what an upscaler meets."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture
def models(tmp_path) -> Path:
    """A paths.models folder laid out as the WebUI's."""
    root = tmp_path / "models"
    put(root / "ESRGAN/4x-Tiny.pth", esrgan(4))
    put(root / "ESRGAN/sub/2x-Tiny.safetensors", esrgan(2))
    put(root / "RealESRGAN/RealESRGAN_x4plus.pth", esrgan(4, seed=1))
    put(root / "RealESRGAN/RealESRGAN_x4plus.safetensors", esrgan(4, seed=1))
    put(root / "upscale_models/2x-Compact.safetensors", compact(2))
    return root


# --- names ------------------------------------------------------------------------------

def test_names_resolve_as_the_webuis(models, tmp_path):
    assert upscaler_models.resolve("4x-Tiny", models) == models / "ESRGAN/4x-Tiny.pth"
    assert upscaler_models.resolve("4x-Tiny.pth", models) == models / "ESRGAN/4x-Tiny.pth"
    assert upscaler_models.resolve("2x-Tiny", models) == models / "ESRGAN/sub/2x-Tiny.safetensors"
    assert upscaler_models.resolve("2x-Compact", models) == \
        models / "upscale_models/2x-Compact.safetensors"
    # the WebUI's display name; the .safetensors beside the pickle is preferred
    assert upscaler_models.resolve("R-ESRGAN 4x+", models) == \
        models / "RealESRGAN/RealESRGAN_x4plus.safetensors"
    assert upscaler_models.resolve("RealESRGAN_x4plus.pth", models) == \
        models / "RealESRGAN/RealESRGAN_x4plus.pth"  # an extension says which
    path = put(tmp_path / "elsewhere/mine.pth", esrgan(2))
    assert upscaler_models.resolve(str(path), None) == path
    with pytest.raises(names.NameNotFound, match="4x-Tiny"):
        upscaler_models.resolve("4x-Tinny", models)


def test_infotext_names_are_the_webuis(models):
    of = upscaler_models.UpscalerFile.of
    assert of(models / "RealESRGAN/RealESRGAN_x4plus.pth", "RealESRGAN_x4plus").name == \
        "R-ESRGAN 4x+"
    assert of(models / "RealESRGAN/RealESRGAN_x4plus.pth", "R-ESRGAN 4x+").name == "R-ESRGAN 4x+"
    assert of(models / "ESRGAN/4x-Tiny.pth", "4x-Tiny.pth").name == "4x-Tiny"


def test_an_unknown_upscaler_fails_before_any_run_folder(models, tmp_path):
    job = {**BASE, "paths": {"models": str(models)}, "run": {"dir": str(tmp_path / "r")},
           "post": [{"upscale": {"upscaler": "Lanczos", "upscaler_2": ["4x-Tiny", "4x-UltraSharp"],
                                 "upscaler_2_visibility": 0.5}}]}
    with pytest.raises(JobError) as err:
        runner.prepare(validate(job), lambda key: "test")
    [problem] = err.value.problems
    assert problem.key == "post.0.upscale.upscaler_2"
    assert "4x-UltraSharp" in problem.message and "ESRGAN,RealESRGAN,SwinIR,DAT,HAT" in \
        problem.message and "Lanczos, Nearest" in problem.message
    assert not (tmp_path / "r").exists()


def test_latent_upscalers_are_hires_fix_only():
    with pytest.raises(JobError, match=r"upscale.upscaler.*upscales latents"):
        validate({**BASE, "post": [{"upscale": {"upscaler": "Latent (bicubic)"}}]})
    validate({**BASE, "post": [{"hires_fix": {"upscaler": "Latent (bicubic)"}}]})


# --- loading ----------------------------------------------------------------------------

class _Marker:
    """A pickle that runs code when loaded: it makes a folder."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.folder,))


def test_spandrel_reads_the_architectures_and_scales(models):
    four = spandrel_files.load(models / "ESRGAN/4x-Tiny.pth")
    two = spandrel_files.load(models / "upscale_models/2x-Compact.safetensors")
    assert (four.architecture.id, four.scale) == ("ESRGAN", 4)
    assert (two.architecture.id, two.scale) == ("Compact", 2)
    # Real-ESRGAN's own files wrap the weights in params_ema
    wrapped = put(models / "RealESRGAN/wrapped.pth", {"params_ema": esrgan(2)})
    assert spandrel_files.load(wrapped).scale == 2


def test_a_pickle_needing_code_is_refused_unless_allowed(models, tmp_path):
    marker = tmp_path / "code-ran"
    path = put(models / "ESRGAN/lightning.pth",
               {"params_ema": esrgan(2), "args": argparse.Namespace(lr=1), "x": _Marker(marker)})
    job = {**BASE, "paths": {"models": str(models)}, "run": {"dir": str(tmp_path / "r")},
           "post": [{"upscale": {"upscaler": "lightning"}}]}
    with pytest.raises(JobError) as err:
        runner.prepare(validate(job), lambda key: "test")
    [problem] = err.value.problems
    assert problem.key == "post.0.upscale.upscaler"
    assert str(path) in problem.message and "model.allow_pickle: true" in problem.message
    assert not marker.exists()
    job["model"] = {"allow_pickle": True}
    runner.prepare(validate(job), lambda key: "test")
    assert marker.exists()


def test_a_file_spandrel_does_not_know_is_refused(tmp_path):
    path = put(tmp_path / "odd.safetensors", {"foo.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelFileError, match="does not recognise"):
        spandrel_files.load(path)


def test_a_face_restorer_is_not_an_upscaler(tmp_path):
    face = SimpleNamespace(purpose="FaceSR", architecture=SimpleNamespace(name="GFPGAN"))
    with pytest.raises(ModelFileError, match="GFPGAN model for FaceSR, not an upscaler"):
        upscaler_models.check(face, tmp_path / "GFPGANv1.4.pth")
    upscaler_models.check(SimpleNamespace(purpose="SR"), tmp_path / "4x.pth")


# --- tiles ------------------------------------------------------------------------------

def test_the_scaled_grid_is_the_grid_times_the_factor():
    grid = tiles.layout(200, 120, 64, 64, 8)
    big = tiles.scaled(grid, 4)
    assert (big.width, big.height, big.tile_w, big.tile_h, big.overlap) == (800, 480, 256, 256, 32)
    assert big.boxes == [tuple(4 * v for v in box) for box in grid.boxes]


def test_tile_grid_never_exceeds_the_picture():
    assert upscaler_models.tile_grid(64, 64, 192, 8) is None
    assert upscaler_models.tile_grid(300, 100, 0, 8) is None  # 0: the whole picture
    grid = upscaler_models.tile_grid(300, 100, 192, 8)
    assert (grid.tile_w, grid.tile_h, grid.xs, grid.ys) == (192, 100, (0, 108), (0,))


def nearest(scale: int):
    return lambda t: F.interpolate(t, scale_factor=scale, mode="nearest")


@pytest.mark.parametrize("scale", [2, 4])
def test_tiles_blend_back_exactly_for_a_pointwise_model(scale):
    """A model that looks at one pixel at a time gives the same picture in tiles: the
    geometry and the ramps are right (a constant stays constant, edges meet)."""
    image = picture(200, 136)
    cpu = torch.device("cpu")
    whole = upscaler_models.upscale_tiled(nearest(scale), image, scale, 0, 0, cpu, torch.float32)
    tiled = upscaler_models.upscale_tiled(nearest(scale), image, scale, 64, 8, cpu,
                                          torch.float32)
    assert tiled.size == (200 * scale, 136 * scale)
    assert np.array_equal(np.asarray(whole), np.asarray(tiled))
    flat = Image.new("RGB", (200, 136), (90, 140, 30))
    out = upscaler_models.upscale_tiled(nearest(scale), flat, scale, 48, 16, cpu, torch.float32)
    assert set(map(tuple, np.asarray(out).reshape(-1, 3))) == {(90, 140, 30)}


def test_tiles_match_the_whole_picture_for_a_conv_net(tmp_path):
    """A convolutional net sees 3 px around each pixel; tiles overlapping by 16 px give the
    whole picture's result but for small differences where a tile's zero padding leaks
    through the blend."""
    model = spandrel_files.load(put(tmp_path / "c.safetensors", compact(2)))
    image = picture(160, 96)
    cpu = torch.device("cpu")
    whole = upscaler_models.upscale_tiled(model, image, 2, 0, 0, cpu, torch.float32)
    tiled = upscaler_models.upscale_tiled(model, image, 2, 48, 16, cpu, torch.float32)
    diff = np.abs(np.asarray(whole, np.int16) - np.asarray(tiled, np.int16))
    assert diff.mean() < 0.05 and diff.max() <= 2
    unblended = upscaler_models.upscale_tiled(model, image, 2, 48, 0, cpu, torch.float32)
    assert np.abs(np.asarray(whole, np.int16) - np.asarray(unblended, np.int16)).mean() > \
        diff.mean()


def test_a_model_runs_until_the_scale_is_reached_then_lanczos():
    """The WebUI's Upscaler.upscale: x2 passes until x3 is covered (two), then Lanczos down
    to the size rounded to a multiple of 8; a model pass always grows the picture."""
    passes = []

    def double(im):
        passes.append(im.size)
        return im.resize((im.width * 2, im.height * 2), Image.Resampling.NEAREST)

    out = upscalers.upscale(Image.new("RGB", (50, 30)), 3, "2x", double)
    assert passes == [(50, 30), (100, 60)] and out.size == (144, 88)
    passes.clear()
    out = upscalers.resize(Image.new("RGB", (64, 64)), 128, 96, "2x", double)
    assert passes == [(64, 64)] and out.size == (128, 96)


# --- the steps --------------------------------------------------------------------------

def test_extras_upscale_with_a_model_and_upscaler_2(models, tmp_path, monkeypatch):
    loads: dict[str, int] = {}
    real = spandrel_files.load

    def counted(path, allow_pickle=False):
        loads[Path(path).name] = loads.get(Path(path).name, 0) + 1
        return real(path, allow_pickle)

    monkeypatch.setattr(spandrel_files, "load", counted)
    job = {**BASE, "paths": {"models": str(models)},
           "executor": {"upscaler_tile_px": 32, "upscaler_tile_overlap": 8},
           "post": [{"upscale": {"scale": 2, "upscaler": "R-ESRGAN 4x+",
                                 "upscaler_2": ["Lanczos", "2x-Tiny"],
                                 "upscaler_2_visibility": 0.4}}]}
    assert run_job(job, tmp_path / "r") == 0
    done = entries(tmp_path / "r")
    pictures = [image(tmp_path / "r", e) for e in done]
    assert [p.shape for p in pictures] == [(128, 128, 3)] * 2
    assert not np.array_equal(pictures[0], pictures[1])
    params = parse_infotext(png.read_text(tmp_path / "r" / done[1]["file"])["parameters"])[2]
    assert (params["Postprocess upscaler"], params["Postprocess upscaler 2"],
            params["Postprocess upscaler 2 visibility"]) == ("R-ESRGAN 4x+", "2x-Tiny", "0.4")
    sha = {name: upscaler_models.hashing.sha256(models / path) for name, path in
           (("R-ESRGAN 4x+", "RealESRGAN/RealESRGAN_x4plus.safetensors"),
            ("2x-Tiny", "ESRGAN/sub/2x-Tiny.safetensors"))}
    assert done[0]["recipe"]["model"]["upscalers"] == {"R-ESRGAN 4x+": sha["R-ESRGAN 4x+"]}
    assert done[1]["recipe"]["model"]["upscalers"] == sha
    stage = done[1]["recipe"]["stages"][1]["params"]
    assert stage["upscaler_model"]["tile"] == [32, 8]
    # each file once to check it at prepare, once for the run: not once per image
    assert loads == {"RealESRGAN_x4plus.safetensors": 2, "2x-Tiny.safetensors": 2}


def test_hires_fix_with_a_model_upscaler(models, tmp_path):
    job = {**BASE, "paths": {"models": str(models)},
           "post": [{"hires_fix": {"scale": 2, "upscaler": "2x-Compact", "steps": 2,
                                   "denoise": 0.3}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    assert image(tmp_path / "r", entry).shape == (128, 128, 3)
    params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])["parameters"])[2]
    assert params["Hires upscaler"] == "2x-Compact"


def test_a_changed_upscaler_file_changes_the_key_and_a_resume_refuses(models, tmp_path):
    job = {**BASE, "paths": {"models": str(models)},
           "post": [{"upscale": {"scale": 2, "upscaler": "4x-Tiny"}}]}
    assert run_job(job, tmp_path / "r") == 0
    key = entries(tmp_path / "r")[0]["key"]
    put(models / "ESRGAN/4x-Tiny.pth", esrgan(4, seed=7))
    other = runner.prepare(validate({**job, "run": {"dir": str(tmp_path / "s")}}),
                           lambda k: "test")
    assert other.plan.key(0) != key
    with pytest.raises(JobError, match="upscaler:4x-Tiny"):
        run_job(job, tmp_path / "r")


def test_sd_upscale_with_a_model_and_reproduce_with_its_tiles(models, tmp_path):
    """SD upscale takes a model too; reproduce renders it again with the recorded upscaler
    tiles (an executor setting the PNG's job does not carry)."""
    from sdbatch.reproduce import reproduce

    job = {**BASE, "paths": {"models": str(models)},
           "executor": {"upscaler_tile_px": 24, "upscaler_tile_overlap": 4},
           "post": [{"sd_upscale": {"upscaler": "2x-Tiny", "tile_overlap": 16, "steps": 2}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    assert image(tmp_path / "r", entry).shape == (128, 128, 3)
    params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])["parameters"])[2]
    assert params["SD upscale upscaler"] == "2x-Tiny"
    assert reproduce(tmp_path / "r" / entry["file"])


def test_jobs_on_tiny_find_upscalers_beside_it(tmp_path, monkeypatch):
    """The embedded family's folder is searched after paths.models, as for its LoRA."""
    from sdbatch import model_specs

    family = tmp_path / "family"
    put(family / "ESRGAN/4x-Family.safetensors", esrgan(4))
    monkeypatch.setattr(model_specs.tiny, "family_models", lambda: family)
    job = validate({**BASE, "post": [{"upscale": {"upscaler": "4x-Family"}}]})
    files, problems = model_specs.resolve_upscalers(job)
    assert problems == [] and files["4x-Family"].path == family / "ESRGAN/4x-Family.safetensors"


def test_a_model_file_spandrel_cannot_parse_names_the_file(tmp_path):
    """Keys of a known architecture with a weight cut short: spandrel's own checks fail
    (an AssertionError for Compact), which must name the file, not end the run."""
    import safetensors.torch

    from sdbatch.models import spandrel_files, tiny
    from sdbatch.models.single_file import ModelFileError

    weights = safetensors.torch.load_file(
        str(tiny.family_models() / "ESRGAN" / "2x-tiny-Compact.safetensors"))
    last = sorted(weights)[-1]
    weights[last] = weights[last][:1].contiguous()
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(weights, str(broken))
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: spandrel cannot read it"):
        spandrel_files.load(broken)
