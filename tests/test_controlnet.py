"""ControlNet units on the tiny model: loading in the extension's layout, the family check,
the control modes' maths, several units, the guidance window, and every diffusion stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdbatch import control, preprocessors
from sdbatch import run as runner
from sdbatch.models import controlnet, ldm_export
from sdbatch.output.infotext import parse_infotext
from sdbatch.schema import JobError, validate
from sdbatch.tiny_train import scenes

BASE = {"prompt": "a red building, two storeys, lawn, blue sky", "negative_prompt": "",
        "params": {"sampler": "Euler", "steps": 4, "cfg_scale": 5, "seed": 3,
                   "width": 64, "height": 64}}


def random_controlnet(unet, seed: int = 0, scale: float = 0.3):
    """A ControlNet copied from ``unet`` with random zero convolutions (diffusers' from_unet
    leaves them zero: a no-op), so it steers."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdbatch.models.ldm_export import own_weights

    plain = UNet2DConditionModel.from_config(unet.config)  # the shared stack may hold LoRAs
    plain.load_state_dict(own_weights(unet))
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(plain, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.normal_(0, scale)
    return cn.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_stack):
    """paths.models with ControlNet/control_rand.safetensors (original layout) and a
    second one, control_other, for two-unit tests."""
    root = tmp_path_factory.mktemp("models")
    ldm_export.save_controlnet(random_controlnet(tiny_stack.pipe.unet, 0),
                               root / "ControlNet" / "control_rand.safetensors")
    ldm_export.save_controlnet(random_controlnet(tiny_stack.pipe.unet, 1),
                               root / "ControlNet" / "control_other.safetensors")
    return root


@pytest.fixture(scope="module")
def edges(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("assets") / "building.png"
    Image.fromarray(scenes.draw(scenes.Scene(position="left", storeys=3), 64).image).save(path)
    return path


def job(models: Path, edges: Path, units: list[dict], **extra) -> dict:
    full = [{"model": "control_rand", "image": str(edges), "preprocessor": "canny",
             "processor_res": 64, **u} for u in units]
    return {**BASE, "paths": {"models": str(models)}, "controlnet": full, **extra}


def run_job(raw: dict, folder: Path) -> list[dict]:
    raw = {**raw, "run": {**raw.get("run", {}), "dir": str(folder), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def pixels(folder: Path, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / entry["file"]).convert("RGB"), dtype=np.int16)


# --- files ----------------------------------------------------------------------------------


def test_a_file_in_the_extensions_layout_loads_offline_weight_for_weight(tiny_stack, tmp_path):
    cn = random_controlnet(tiny_stack.pipe.unet)
    path = ldm_export.save_controlnet(cn, tmp_path / "control_x.safetensors")
    keys = set(json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8],
                                                                   "little")]))
    assert {"input_hint_block.0.weight", "zero_convs.0.0.weight",
            "middle_block_out.0.weight", "time_embed.0.weight"} <= keys
    loaded = controlnet.load(path, tiny_stack.pipe.unet.config, torch.float32)
    want, got = cn.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    # with the full model's prefix, as the first released files had it, and as a .pth
    from safetensors.torch import load_file

    prefixed = {f"control_model.{k}": v for k, v in load_file(path).items()}
    torch.save(prefixed, tmp_path / "control_y.pth")
    again = controlnet.load(tmp_path / "control_y.pth", tiny_stack.pipe.unet.config,
                            torch.float32).state_dict()
    assert all(torch.equal(want[k], again[k]) for k in want)
    # ControlNet 1.0 files hold the whole SD model beside control_model.*: only it is taken
    whole = {**prefixed, "model.diffusion_model.time_embed.0.weight": torch.zeros(4, 4),
             "first_stage_model.decoder.conv_in.bias": torch.zeros(4)}
    torch.save(whole, tmp_path / "control_sd15_canny.pth")
    third = controlnet.load(tmp_path / "control_sd15_canny.pth", tiny_stack.pipe.unet.config,
                            torch.float32).state_dict()
    assert all(torch.equal(want[k], third[k]) for k in want)


def test_a_diffusers_folder_is_found_by_name_and_loads(tiny_stack, tmp_path):
    from sdbatch.models import names

    cn = random_controlnet(tiny_stack.pipe.unet)
    cn.save_pretrained(tmp_path / "ControlNet" / "control_folder")
    path = names.resolve("controlnet", "control_folder", tmp_path)
    assert path == tmp_path / "ControlNet" / "control_folder"
    assert controlnet.misfit(path, tiny_stack.pipe.unet.config, "tiny") is None
    got = controlnet.load(path, tiny_stack.pipe.unet.config, torch.float32).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in cn.state_dict().items())


def test_an_sdxl_shaped_file_loads_with_its_added_embedding(tmp_path):
    from tests.conftest import build_tiny_sdxl

    pipe = build_tiny_sdxl(tmp_path)
    cn = random_controlnet(pipe.unet)
    path = ldm_export.save_controlnet(cn, tmp_path / "control_xl.safetensors")
    assert "label_emb.0.0.weight" in controlnet.read_shapes(path)
    loaded = controlnet.load(path, pipe.unet.config, torch.float32)
    want, got = cn.state_dict(), loaded.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # and it steers an SDXL txt2img (pooled text and size ids handed to it too)
    from sdbatch.stages import txt2img
    from tests.test_single_file import render, stack_of

    stack = stack_of(pipe)
    image = scenes.draw(scenes.Scene(position="left"), 64).image
    unit = control.Unit({"weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0,
                         "control_mode": "balanced", "preprocessor": "canny",
                         "resize_mode": "crop_and_resize"}, loaded,
                        preprocessors.run("canny", image, 64, 100, 200))
    plain = txt2img.run(stack, (render(),))[0].image
    steered = txt2img.run(stack, (render(),), control=[unit])[0].image
    assert not np.array_equal(np.asarray(plain), np.asarray(steered))


def meta_shapes(family: str) -> dict:
    """A released-size ControlNet's keys and shapes in the original layout (no weights)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdbatch.models import families

    config = UNet2DConditionModel.load_config(families.config_folder(family) / "unet")
    with torch.device("meta"):
        cn = ControlNetModel.from_config(controlnet.config_from_unet(config))
    return {k: tuple(v.shape) for k, v in
            ldm_export.controlnet_to_ldm(cn.state_dict(), cn.config).items()}, config


def test_family_signatures_of_released_shapes():
    sd15, sd15_unet = meta_shapes("sd15")
    sdxl, sdxl_unet = meta_shapes("sdxl")
    a = controlnet.shapes_signature(sd15, "x")
    b = controlnet.shapes_signature(sdxl, "x")
    assert a == controlnet.config_signature(sd15_unet) and len(a.residuals) == 13
    assert b == controlnet.config_signature(sdxl_unet) and len(b.residuals) == 10
    assert a.cross_attention_dim == 768 and b.cross_attention_dim == 2048
    assert "SD1.x" in a.words() and "SDXL" in b.words()


def test_a_controlnet_of_another_architecture_is_refused_before_any_work(tiny_stack,
                                                                       tmp_path):
    """A ControlNet-Union (extra task layers) has the family's signature but not our layers:
    it is refused while the job is checked, not in every batch."""
    from safetensors.torch import load_file, save_file

    path = ldm_export.save_controlnet(random_controlnet(tiny_stack.pipe.unet),
                                      tmp_path / "plain.safetensors")
    unet = tiny_stack.pipe.unet.config
    assert controlnet.misfit(path, unet, "tiny") is None
    union = {**load_file(path), "task_embedding": torch.zeros(8, 32),
             "control_add_embedding.linear_1.weight": torch.zeros(32, 8)}
    save_file(union, str(tmp_path / "union.safetensors"))
    why = controlnet.misfit(tmp_path / "union.safetensors", unet, "tiny")
    assert why and "union.safetensors" in why and "ControlNet-Union" in why


def test_a_controlnet_of_another_family_is_refused_before_any_work(tmp_path, tiny_stack,
                                                                   edges):
    from tests.conftest import build_tiny_sdxl

    pipe = build_tiny_sdxl(tmp_path / "xl")
    models = tmp_path / "models"
    ldm_export.save_controlnet(random_controlnet(pipe.unet),
                               models / "ControlNet" / "control_xl.safetensors")
    raw = job(models, edges, [{"model": "control_xl"}])
    with pytest.raises(JobError) as e:
        run_job(raw, tmp_path / "r")
    assert "control_xl.safetensors is a ControlNet for cross-attention 96" in str(e.value)
    assert not (tmp_path / "r").exists()
    # and the reverse: the tiny ControlNet on the small SDXL stack
    pipe.save_pretrained(models / "Stable-diffusion" / "xl")
    ldm_export.save_controlnet(random_controlnet(tiny_stack.pipe.unet),
                               models / "ControlNet" / "control_sd.safetensors")
    raw = {**job(models, edges, [{"model": "control_sd"}]), "model": {"checkpoint": "xl"}}
    with pytest.raises(JobError) as e:
        run_job(raw, tmp_path / "r2")
    assert "the stack xl is cross-attention 96" in str(e.value)
    assert not (tmp_path / "r2").exists()


def test_unknown_model_image_and_preprocessor_are_refused_with_their_keys(tmp_path, models,
                                                                          edges):
    raw = job(models, edges, [{"model": "control_nope"}])
    raw["controlnet"][0]["image"] = "missing.png"
    with pytest.raises(JobError) as e:
        run_job(raw, tmp_path / "r")
    text = str(e.value)
    assert "controlnet[0].image" in text and "no control image at 'missing.png' (looked in " \
        in text  # the folders searched, as for init_image
    assert "control_nope" in text and "controlnet[0].model" in text
    with pytest.raises(JobError) as e:
        validate(job(models, edges, [{"preprocessor": "depth_midas"}]))
    assert "controlnet[0].preprocessor" in str(e.value) and "preprocessor: none" in str(e.value)


def test_window_and_thresholds_are_checked(models, edges):
    with pytest.raises(JobError) as e:
        validate(job(models, edges, [{"guidance_start": 0.8, "guidance_end": 0.2},
                                     {"low_threshold": 300}]))
    text = str(e.value)
    assert "controlnet[0].guidance_start" in text and "must not be after" in text
    assert "low_threshold is canny's Low Threshold: 1..255, got 300" in text


# --- the maths of one model call ----------------------------------------------------------------


def residuals(tiny_stack, units: list[control.Unit], uncond_rows: int = 1):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 64)
    rows = [[control.at_size(u, 64, 64)] * 2 for u in units]
    with control.Control(units, rows, "cpu", torch.float32).encoded() as c:
        return c.residuals(x, torch.tensor(500), context, [0, 1], uncond_rows, 0, 20, None)


def test_the_guidance_window_counts_the_step_the_webui_reports():
    """The extension tests the WebUI's state.sampling_step, the last finished step: steps 0
    and 1 both read 0, so a window acts one step later than its fractions say, both ends
    included."""
    def window(start, end, steps):
        a = control.Active(None, torch.zeros(1), 1.0, start, end, False, False)
        return [i for i in range(steps) if a.on(i, steps)]

    assert [control.window_fraction(i, 20) for i in range(3)] == [0.0, 0.0, 0.05]
    assert window(0.2, 0.5, 20) == list(range(5, 12))
    assert window(0.0, 1.0, 8) == list(range(8))
    assert window(0.0, 0.0, 8) == [0, 1]  # the extension still acts with end 0
    assert window(0.3, 1.0, 3) == [2]  # an img2img pass of 3 steps counts its own
    assert window(0.5, 1.0, 3) == []  # its last step reads 1 / 3
    zero = control.Active(None, torch.zeros(1), 0.0, 0.0, 1.0, False, False)
    assert not any(zero.on(i, 8) for i in range(8))


def unit(tiny_stack, edges, path: Path, **params) -> control.Unit:
    p = {"weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "balanced",
         "preprocessor": "canny", "resize_mode": "crop_and_resize", **params}
    detected = preprocessors.run("canny", np.asarray(Image.open(edges).convert("RGB")), 64,
                                 100, 200)
    return control.Unit(p, tiny_stack.controlnet(path), detected)


def test_the_three_control_modes_scale_as_the_extension(tiny_stack, models, edges):
    path = models / "ControlNet" / "control_rand.safetensors"
    down_b, mid_b = residuals(tiny_stack, [unit(tiny_stack, edges, path, weight=0.8)])
    down_p, mid_p = residuals(tiny_stack, [unit(tiny_stack, edges, path, weight=0.8,
                                                control_mode="my_prompt")])
    down_c, mid_c = residuals(tiny_stack, [unit(tiny_stack, edges, path, weight=0.8,
                                                control_mode="controlnet")])
    n = len(down_b) + 1
    assert n == 5
    for i, (b, p) in enumerate(zip([*down_b, mid_b], [*down_p, mid_p], strict=True)):
        assert torch.allclose(p, b * 0.825 ** (12 - i), atol=1e-6)  # soft injection
    for p, c in zip([*down_p, mid_p], [*down_c, mid_c], strict=True):
        assert torch.equal(c[1], p[1])  # the prompt's row as my_prompt
        assert c[0].abs().max() == 0 and p[0].abs().max() > 0  # none on the negative's
    # the UNet call without guidance (no negative rows): controlnet mode keeps every row
    down_u, _ = residuals(tiny_stack, [unit(tiny_stack, edges, path, weight=0.8,
                                            control_mode="controlnet")], uncond_rows=0)
    assert torch.equal(down_u[0][0], down_p[0][0])


def test_two_units_add_their_residuals(tiny_stack, models, edges):
    a = unit(tiny_stack, edges, models / "ControlNet" / "control_rand.safetensors")
    b = unit(tiny_stack, edges, models / "ControlNet" / "control_other.safetensors",
             weight=0.5)
    da, ma = residuals(tiny_stack, [a])
    db, mb = residuals(tiny_stack, [b])
    dab, mab = residuals(tiny_stack, [a, b])
    assert torch.allclose(mab, ma + mb) and all(
        torch.allclose(s, x + y) for s, x, y in zip(dab, da, db, strict=True))
    assert not torch.allclose(mab, ma) and not torch.allclose(mab, mb)


def test_the_hint_is_encoded_once_per_batch(tiny_stack, models, edges, monkeypatch):
    path = models / "ControlNet" / "control_rand.safetensors"
    u = unit(tiny_stack, edges, path)
    calls = []
    encoder = u.model.controlnet_cond_embedding
    monkeypatch.setattr(encoder, "forward", lambda x, real=encoder.forward: (
        calls.append(1), real(x))[1])
    from sdbatch.matrix import expand, resolve_seeds
    from sdbatch.stages import txt2img

    renders = expand(resolve_seeds(validate({**BASE, "params": {**BASE["params"],
                                                                "batch_size": 2}}), 0))
    txt2img.run(tiny_stack, tuple(renders[:2]), control=[u])
    assert len(calls) == 1
    assert u.model.controlnet_cond_embedding is encoder  # put back after the batch


# --- whole jobs -----------------------------------------------------------------------------------


def test_weight_zero_gives_the_image_without_the_unit(tmp_path, models, edges, monkeypatch):
    from sdbatch.models import controlnet as cn_module

    loads = []
    real = cn_module.load
    monkeypatch.setattr(cn_module, "load", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    plain = run_job({**BASE}, tmp_path / "plain")
    off = run_job(job(models, edges, [{"weight": [0.0, 1.0]}]), tmp_path / "w")
    assert len(loads) == 1  # a weight axis never reloads the ControlNet
    ended = run_job(job(models, edges, [{"guidance_end": 0.0}]), tmp_path / "e")
    base = pixels(tmp_path / "plain", plain[0])
    assert np.array_equal(pixels(tmp_path / "w", off[0]), base)
    assert not np.array_equal(pixels(tmp_path / "w", off[1]), base)  # weight 1 steers
    # end 0 still acts on the first two steps, as in the WebUI, and no more than they
    ended_pixels = pixels(tmp_path / "e", ended[0])
    assert not np.array_equal(ended_pixels, base)
    assert not np.array_equal(ended_pixels, pixels(tmp_path / "w", off[1]))


def test_modes_and_units_change_the_image(tmp_path, models, edges):
    done = run_job(job(models, edges, [{"control_mode": ["balanced", "my_prompt",
                                                         "controlnet"]}]), tmp_path / "m")
    pictures = [pixels(tmp_path / "m", e) for e in done]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(pictures[i], pictures[j])
    two = run_job(job(models, edges, [{}, {"model": "control_other", "weight": 0.5}]),
                  tmp_path / "two")
    other = run_job(job(models, edges, [{"model": "control_other", "weight": 0.5}]),
                    tmp_path / "other")
    both = pixels(tmp_path / "two", two[0])
    assert not np.array_equal(both, pictures[0])
    assert not np.array_equal(both, pixels(tmp_path / "other", other[0]))


def test_every_diffusion_stage_takes_units_loaded_once_per_stack(tmp_path, models, edges,
                                                                 monkeypatch):
    from sdbatch.models import controlnet as cn_module

    loads = []
    real = cn_module.load
    monkeypatch.setattr(cn_module, "load", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    mask = tmp_path / "mask.png"
    m = np.zeros((128, 128), np.uint8)
    m[32:96, 40:100] = 255
    Image.fromarray(m).save(mask)
    raw = job(models, edges, [{"weight": 0.6}], post=[
        {"hires_fix": {"scale": 1.5, "steps": 2, "denoise": 0.5}},
        {"img2img": {"denoise": 0.4, "steps": 3}},
        {"inpaint": {"mask": str(mask), "denoise": 0.6, "steps": 3,
                     "inpaint_area": "only_masked", "width": 64, "height": 64}},
        {"sd_upscale": {"scale": 2, "denoise": 0.3, "steps": 3, "width": 128, "height": 128,
                        "tile_overlap": 64, "controlnet": [{"model": "control_other",
                                                            "image": str(edges),
                                                            "preprocessor": "canny",
                                                            "processor_res": 64}]}}])
    done = run_job(raw, tmp_path / "r")
    assert [e["status"] for e in done] == ["ok"]
    assert pixels(tmp_path / "r", done[0]).shape == (192, 192, 3)
    assert sorted(p.name for p in loads) == ["control_other.safetensors",
                                             "control_rand.safetensors"]  # once each
    stages = done[0]["recipe"]["stages"]
    assert [len(s["params"].get("controlnet", [])) for s in stages] == [1, 1, 1, 1, 1]
    assert stages[4]["params"]["controlnet"][0]["model"] == "control_other"  # its own unit
    for name in done[0]["controlnet"]:
        assert (tmp_path / "r" / name).is_file()
    assert len(done[0]["controlnet"]) == 1  # one preprocessed map, shared by all stages
    info = parse_infotext(Image.open(tmp_path / "r" / done[0]["file"]).info["parameters"])[2]
    assert info["ControlNet 0"].startswith("Module: canny, Model: control_rand [")
    assert info["ControlNet 0"].endswith(
        "Weight: 0.6, Resize Mode: Crop and Resize, Processor Res: 64, Threshold A: 100.0, "
        "Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        "Control Mode: Balanced")


def test_unit_keys_are_axes_and_zip(models, edges):
    from sdbatch.matrix import count

    raw = job(models, edges, [{"weight": [0.5, 1.0], "guidance_end": [0.5, 1.0]}],
              zip=[["controlnet.0.weight", "controlnet.0.guidance_end"]])
    assert count(validate(raw)) == 2
    raw = job(models, edges, [{"weight": [0.5, 1.0]}],
              post=[{"img2img": {"denoise": 0.3, "controlnet": [
                  {"model": "control_rand", "image": str(edges), "pixel_perfect": True,
                   "weight": [0.2, 0.4, 0.6]}]}}])
    assert count(validate(raw)) == 6


def test_the_tiny_familys_controlnet_is_found_by_name():
    from sdbatch.models import names, tiny

    shipped = tiny.family_models() / "ControlNet" / "control_tiny_canny.safetensors"
    if not shipped.exists():
        pytest.skip("control_tiny_canny is not trained yet (python -m sdbatch.tiny_train."
                    "controlnet)")
    assert names.resolve("controlnet", "control_tiny_canny", tiny.family_models()) == shipped


@pytest.mark.slow
def test_a_released_size_sd15_controlnet_file_loads_offline(tmp_path):
    """A random-weight ControlNet in the released SD1.5 shapes (fp16, ~720 MB), written in the
    original layout, loads through the shipped SD1.5 UNet config alone."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdbatch.models import families

    config = UNet2DConditionModel.load_config(families.config_folder("sd15") / "unet")
    torch.manual_seed(0)
    with torch.no_grad():
        cn = ControlNetModel.from_config(controlnet.config_from_unet(config)).half()
    keys = ("controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.11.weight",
            "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            "mid_block.resnets.1.conv2.weight")
    samples = {k: cn.state_dict()[k].clone() for k in keys}
    path = ldm_export.save_controlnet(cn, tmp_path / "control_v11p_sd15_random.safetensors")
    del cn
    assert 0.65e9 < path.stat().st_size < 0.8e9
    assert controlnet.misfit(path, config, "sd15") is None
    assert "SD1.x" in controlnet.signature(path).words()
    loaded = controlnet.load(path, config, torch.float16)
    assert sum(p.numel() for p in loaded.parameters()) > 3.5e8
    for k, v in samples.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_an_only_masked_box_clipped_at_the_edge_cuts_the_map_as_the_picture():
    """Inpaint fits the box's crop of the picture to the processing size with resize and
    fill; the map's crop must land on the same pixels (it was stretched)."""
    from sdbatch import control

    detected = np.zeros((64, 64, 3), np.uint8)
    detected[:, 10:12] = 255  # a line 10 px from the left
    unit = control.Unit({"resize_mode": "just_resize"}, None, detected)
    cut = control.cropped(unit, (64, 64), (0, 0, 32, 64), 64, 64)  # a half-width box
    # the 32 x 64 crop fits the height as it is, centred: 16 px of fill on the left
    assert list(np.flatnonzero(cut[32, :, 0] > 128)) == [26, 27]  # stretched: 20-23


def test_pixel_perfect_in_a_hires_fix_is_the_first_pass_map_as_the_extension():
    """The extension preprocesses once, at the first pass's pixel-perfect resolution, and
    resizes that map for the hires pass; a step run on its own (SD upscale) computes its
    own."""
    from sdbatch import matrix
    from sdbatch.plan import InputImage, make_plan

    def calls(post):
        r = matrix.expand(matrix.resolve_seeds(validate({
            "prompt": "x", "params": {"width": 64, "height": 64, "seed": 1}, "post": post,
            "controlnet": [{"model": "control_rand", "image": "c.png", "preprocessor": "canny",
                            "pixel_perfect": True}]}), 0))[0]
        chain = make_plan([r], {"tiny": "x"}, 1,
                          inputs={"c.png": InputImage("ab" * 32, (100, 60))}).chains[0]
        return [c.params.get("controlnet", [None])[0] for c in chain]

    first, hires = calls([{"hires_fix": {"scale": 2}}])
    assert first["processor_res"] == hires["processor_res"] == 64
    assert first["map"] == hires["map"]  # one map, fitted to each stage's size
    first, tiled = calls([{"sd_upscale": {"scale": 2}}])
    assert (first["processor_res"], tiled["processor_res"]) == (64, 128)
    # a hires fix of an upscaled picture is not the first pass's continuation
    first, later = calls([{"upscale": {"scale": 2}}, {"hires_fix": {"scale": 1}}])[0:3:2]
    assert (first["processor_res"], later["processor_res"]) == (64, 128)


# --- recolor ---------------------------------------------------------------------------------


def test_recolor_maps_are_lightness_or_value_as_the_extension_computes_them():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:] = (10, 200, 50)
    assert (preprocessors.run("recolor_intensity", img, 64, 1.0, 0) == 200).all()  # HSV V
    lightness = preprocessors.run("recolor_luminance", img, 64, 1.0, 0)
    assert (lightness == lightness[0, 0, 0]).all() and 0 < lightness[0, 0, 0] < 255


@pytest.mark.parametrize("preprocessor", ["recolor_luminance", "recolor_intensity"])
def test_recolored_takes_the_maps_lightness_and_keeps_the_hue(preprocessor):
    import cv2

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    grey = np.full((16, 16, 3), 180, np.uint8)
    out = np.asarray(control.recolored(picture, grey, preprocessor))
    space, channel = ((cv2.COLOR_RGB2LAB, 0) if preprocessor == "recolor_luminance"
                      else (cv2.COLOR_RGB2HSV, 2))
    off = np.abs(cv2.cvtColor(out, space)[:, :, channel].astype(int) - 180)
    assert np.median(off) <= 1  # colours out of gamut at that lightness are clipped
    assert not np.array_equal(out, np.asarray(picture))


def test_recolor_runs_on_each_finished_generation_after_its_hires_fix():
    from sdbatch import matrix
    from sdbatch.plan import InputImage, make_plan

    def flags(post):
        r = matrix.expand(matrix.resolve_seeds(validate({
            "prompt": "x", "params": {"width": 64, "height": 64, "seed": 1}, "post": post,
            "controlnet": [{"model": "control_rand", "image": "c.png",
                            "preprocessor": "brightness"}]}), 0))[0]
        chain = make_plan([r], {"tiny": "x"}, 1,
                          inputs={"c.png": InputImage("ab" * 32, (64, 64))}).chains[0]
        return [c.params.get("recolor", False) for c in chain]

    assert flags([]) == [True]
    assert flags([{"hires_fix": {"scale": 2}}]) == [False, True]
    assert flags([{"img2img": {}}]) == [True, True]  # each a generation of its own
    # inpaint keeps every byte outside its mask: the WebUI recolors before pasting it back
    assert flags([{"inpaint": {"mask": "c.png"}}]) == [True, False]


def test_a_recolor_units_picture_has_its_maps_lightness(tmp_path, models, edges):
    import cv2

    [entry] = run_job(job(models, edges, [{"preprocessor": "recolor_luminance"}]),
                      tmp_path / "r")
    [made] = entry["controlnet"]
    lightness = np.asarray(Image.open(tmp_path / "r" / made))[:, :, 0].astype(int)
    out = np.asarray(Image.open(tmp_path / "r" / entry["file"]).convert("RGB"))
    off = np.abs(cv2.cvtColor(out, cv2.COLOR_RGB2LAB)[:, :, 0] - lightness)
    assert np.median(off) <= 1 and (off <= 3).mean() > 0.9
