"""Face restoration as a post-step and in the Extras upscale, on random-weight GFPGAN
(spandrel) and CodeFormer (spandrel-extra-arches) networks that the tests build and save in
the WebUI's folders: faces found, restored and pasted back, everything else untouched."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdbatch import faces
from sdbatch import run as runner
from sdbatch.executors.intermediates import Intermediates
from sdbatch.models import hashing
from sdbatch.models.image_models import ImageModels, identify
from sdbatch.output import png
from sdbatch.output.infotext import parse_infotext
from sdbatch.schema import JobError, validate
from sdbatch.stages import face_restore
from sdbatch.stages.picture import Picture

from .synthetic_face import draw_face, draw_landscape
from .test_post_steps import BASE, entries, image, run_job

pytestmark = pytest.mark.slow  # two 512 px networks: a few seconds each on a CPU


def _arch(module: str):
    return importlib.import_module(module)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """paths.models with GFPGAN/GFPGANv1.4.pth and Codeformer/codeformer-v0.1.0.pth, random
    weights wrapped in params_ema as the released files are."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gfpgan = _arch("spandrel.architectures.GFPGAN.__arch.gfpganv1_clean_arch").GFPGANv1Clean(
        out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
        fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
        sft_half=True)
    codeformer = _arch("spandrel_extra_arches.architectures.CodeFormer.__arch.codeformer"
                       ).CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64,
                                    latent_size=256, connect_list=["32", "64"])
    for folder, name, net in (("GFPGAN", "GFPGANv1.4.pth", gfpgan),
                              ("Codeformer", "codeformer-v0.1.0.pth", codeformer)):
        (root / folder).mkdir()
        torch.save({"params_ema": net.state_dict()}, root / folder / name)
    return root


@pytest.fixture(scope="module")
def restorers(models_dir) -> ImageModels:
    files = [identify(models_dir / "GFPGAN" / "GFPGANv1.4.pth", False),
             identify(models_dir / "Codeformer" / "codeformer-v0.1.0.pth", False)]
    assert [f.architecture for f in files] == ["GFPGAN", "CodeFormer"]
    return ImageModels({f.sha256: f for f in files}, torch.device("cpu"))


def _model(restorers: ImageModels, architecture: str):
    sha = next(s for s, f in restorers.files.items() if f.architecture == architecture)
    return restorers.get(sha)


def _untouched(picture: np.ndarray) -> np.ndarray:
    """Where no face's paste mask reaches: pixels that must keep their bytes."""
    keep = np.ones(picture.shape[:2], bool)
    for face in faces.detect(picture):
        inverse = faces.cv2.invertAffineTransform(faces.align_matrix(face))
        keep &= faces.paste_mask(inverse, picture.shape[1::-1]) == 0
    return keep


@pytest.mark.parametrize("architecture", ["GFPGAN", "CodeFormer"])
def test_a_face_is_restored_and_pixels_away_from_it_keep_their_bytes(restorers, architecture):
    source = draw_face(384)
    out, count = face_restore.restore(Image.fromarray(source), _model(restorers, architecture),
                                      architecture, 1.0, 0.5, restorers.device)
    out = np.asarray(out)
    assert count == 1 and out.shape == source.shape
    keep = _untouched(source)
    assert keep.mean() > 0.3  # the test would prove nothing if the face covered it all
    assert np.array_equal(out[keep], source[keep])
    face = (slice(150, 230), slice(150, 230))
    assert np.abs(out[face].astype(int) - source[face]).mean() > 5  # random weights: changed


def test_visibility_zero_returns_the_input_and_half_blends(restorers):
    source = Image.fromarray(draw_face(256))
    model = _model(restorers, "GFPGAN")
    same, count = face_restore.restore(source, model, "GFPGAN", 0.0, 0.5, restorers.device)
    assert same is source and count is None
    full, _ = face_restore.restore(source, model, "GFPGAN", 1.0, 0.5, restorers.device)
    half, _ = face_restore.restore(source, model, "GFPGAN", 0.5, 0.5, restorers.device)
    expected = Image.blend(source, full, 0.5)
    assert np.array_equal(np.asarray(half), np.asarray(expected))


def test_a_picture_without_a_face_passes_unchanged(restorers):
    source = Image.fromarray(draw_landscape())
    out, count = face_restore.restore(source, _model(restorers, "GFPGAN"), "GFPGAN", 1.0, 0.5,
                                      restorers.device)
    assert count == 0 and np.array_equal(np.asarray(out), np.asarray(source))


def _inputs(tmp_path: Path) -> tuple[str, str]:
    face, land = tmp_path / "face.png", tmp_path / "land.png"
    Image.fromarray(draw_face(256)).save(face)
    Image.fromarray(draw_landscape(256)).save(land)
    return str(face), str(land)


def test_face_restore_step_records_faces_model_hash_and_infotext(tmp_path, models_dir):
    face, land = _inputs(tmp_path)
    job = {**BASE, "paths": {"models": str(models_dir)}, "init_image": [face, land],
           "post": [{"face_restore": {"model": "CodeFormer", "visibility": 0.5,
                                      "weight": 0.7}},
                    {"upscale": {"scale": 1.5, "upscaler": "Nearest"}}]}
    assert run_job(job, tmp_path / "r") == 0
    done = entries(tmp_path / "r")
    assert [e["status"] for e in done] == ["ok"] * 2
    sha = hashing.sha256(models_dir / "Codeformer" / "codeformer-v0.1.0.pth")
    for e in done:
        restore, up = e["recipe"]["stages"][1:]
        assert restore["kind"] == "face_restore" and up["kind"] == "upscale"
        assert restore["params"]["model_sha256"] == sha
        assert restore["params"]["architecture"] == "CodeFormer"
        # the count survives the step after it (carried with the picture)
        assert restore["faces"] == (1 if e["recipe"]["stages"][0]["params"]["path"] == face
                                    else 0)
    land_done = [e for e in done if e["recipe"]["stages"][0]["params"]["path"] == land]
    src = np.asarray(Image.open(land).resize((384, 384), Image.Resampling.NEAREST))
    assert all(np.array_equal(image(tmp_path / "r", e), src) for e in land_done)
    params = parse_infotext(png.read_text(tmp_path / "r" / done[0]["file"])["parameters"])[2]
    assert params["Face restoration"] == "CodeFormer"
    assert params["CodeFormer weight"] == "0.7" and params["CodeFormer visibility"] == "0.5"
    assert list(params)[0] == "Face restoration" and "Seed" not in params  # no model ran
    made = json.loads((tmp_path / "r" / "run.json").read_text())["made_of"]
    assert made["networks"]["face_restorer:CodeFormer"] == sha


def test_extras_order_is_upscale_then_gfpgan_then_codeformer(tmp_path, models_dir,
                                                             monkeypatch):
    face, _ = _inputs(tmp_path)
    calls = []

    def spy(image, model, architecture, visibility, weight, device):
        """A stand-in restorer (the real one is tested above) that marks what it saw."""
        assert isinstance(model, torch.nn.Module)
        pixels = np.asarray(image)
        out = np.clip(pixels.astype(int) + (5 if architecture == "GFPGAN" else -3), 0, 255)
        calls.append((architecture, image.size, pixels, out.astype(np.uint8), weight))
        return Image.fromarray(out.astype(np.uint8)), len(faces.detect(pixels))

    monkeypatch.setattr(face_restore, "restore", spy)
    job = {**BASE, "paths": {"models": str(models_dir)}, "init_image": face,
           "post": [{"upscale": {"scale": 2, "upscaler": "Lanczos", "gfpgan_visibility": 0.8,
                                 "codeformer_visibility": 1.0, "codeformer_weight": 0.3}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    (first, size1, in1, out1, _), (second, size2, in2, out2, weight) = calls
    assert (first, second) == ("GFPGAN", "CodeFormer")
    assert size1 == size2 == (512, 512)  # both after the upscale
    upscaled = Image.open(face).resize((512, 512), Image.Resampling.LANCZOS)
    assert np.array_equal(in1, np.asarray(upscaled))
    assert np.array_equal(in2, out1) and weight == 0.3  # CodeFormer takes GFPGAN's result
    assert np.array_equal(image(tmp_path / "r", entry), out2)
    stage = entry["recipe"]["stages"][1]
    assert stage["gfpgan_faces"] == 1 and stage["codeformer_faces"] == 1
    assert stage["params"]["gfpgan_sha256"] == hashing.sha256(
        models_dir / "GFPGAN" / "GFPGANv1.4.pth")
    params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])["parameters"])[2]
    assert params["Postprocess upscale by"] == "2"
    assert params["GFPGAN visibility"] == "0.8"
    assert params["CodeFormer visibility"] == "1" and params["CodeFormer weight"] == "0.3"
    assert "Face restoration" not in params  # the Extras write no txt2img key


def test_a_missing_model_is_refused_up_front_with_folder_and_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(faces, "detector_problem", lambda: "OpenCV has no Haar cascades")
    face, _ = _inputs(tmp_path)
    (tmp_path / "empty").mkdir()
    job = {**BASE, "paths": {"models": str(tmp_path / "empty")}, "init_image": face,
           "run": {"dir": str(tmp_path / "r")},
           "post": [{"face_restore": {"model": "CodeFormer"}},
                    {"upscale": {"gfpgan_visibility": 0.5}}]}
    with pytest.raises(JobError) as e:
        runner.prepare(validate(job), lambda key: "jobs/x.yaml")
    text = str(e.value)
    assert "post[0].face_restore.model (jobs/x.yaml): no CodeFormer model file under" in text
    assert str(tmp_path / "empty" / "Codeformer") in text and "codeformer-v0.1.0.pth" in text
    assert "post[1].upscale.gfpgan_visibility" in text and "GFPGANv1.4.pth" in text
    assert "post[0].face_restore.model (jobs/x.yaml): OpenCV has no Haar cascades" in text
    assert not (tmp_path / "r").exists()


def test_a_pickle_that_needs_code_is_refused_without_allow_pickle(tmp_path):
    face, _ = _inputs(tmp_path)
    (tmp_path / "m" / "GFPGAN").mkdir(parents=True)
    evil = tmp_path / "m" / "GFPGAN" / "GFPGANv9.pth"
    torch.save({"params_ema": {"w": torch.zeros(1)}, "opt": argparse.Namespace(a=1)}, evil)
    job = {**BASE, "paths": {"models": str(tmp_path / "m")}, "init_image": face,
           "run": {"dir": str(tmp_path / "r")}, "post": [{"face_restore": {"model": "GFPGAN"}}]}
    with pytest.raises(JobError, match=r"post\[0\]\.face_restore\.model.*allow_pickle"):
        runner.prepare(validate(job), lambda key: "test")


def test_a_file_of_another_architecture_is_refused(tmp_path, models_dir):
    face, _ = _inputs(tmp_path)
    (tmp_path / "m" / "Codeformer").mkdir(parents=True)
    wrong = tmp_path / "m" / "Codeformer" / "codeformer-v0.1.0.pth"
    wrong.symlink_to(models_dir / "GFPGAN" / "GFPGANv1.4.pth")
    job = {**BASE, "paths": {"models": str(tmp_path / "m")}, "init_image": face,
           "run": {"dir": str(tmp_path / "r")}, "post": [{"face_restore": {}}]}
    with pytest.raises(JobError, match=r"face_restore\.model.*is a GFPGAN model, not CodeFormer"):
        runner.prepare(validate(job), lambda key: "test")


def test_intermediates_keep_what_the_chain_found(tmp_path):
    store = Intermediates(tmp_path, 0)
    picture = Picture(Image.new("RGB", (8, 8)), chain_found={"abc": {"faces": 2}})
    store.put("k", picture)
    store.release("k")
    assert Intermediates(tmp_path, 0).get("k").chain_found == {"abc": {"faces": 2}}


def test_every_face_restore_key_is_a_grid_axis():
    from sdbatch import schema

    job = validate({**BASE, "post": [{"face_restore": {}}, {"upscale": {}}]})
    axes = schema.post_axes(job)
    assert {"post.0.face_restore.model", "post.0.face_restore.visibility",
            "post.0.face_restore.weight", "post.1.upscale.gfpgan_visibility",
            "post.1.upscale.codeformer_visibility",
            "post.1.upscale.codeformer_weight"} <= set(axes)
    with pytest.raises(JobError, match="visibility"):
        validate({**BASE, "post": [{"face_restore": {"visibility": 1.5}}]})
