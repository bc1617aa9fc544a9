"""Single-file checkpoints, offline: families, the LDM layout both ways, safety, SDXL txt2img.

Tiny SD1.x and SDXL pipelines are written as single files in the original LDM key layout
by sdbatch's own exporter, loaded back through the single-file loader and rendered. The
shipped family configs are checked against the real models' sizes on the meta device, and
one slow test builds a checkpoint with the real SD1.5 shapes.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from sdbatch.matrix import Render
from sdbatch.models import families, ldm_export, single_file
from sdbatch.models.single_file import ModelFileError
from sdbatch.models.stack import Stack, StackSpec
from sdbatch.models.tokenizer import EOS
from sdbatch.stages import txt2img

from .conftest import build_tiny_sdxl


def txt2img_images(stack, renders, on_step=None):
    """The pictures of a txt2img batch (the stage hands on pictures with their latents)."""
    return [p.image for p in txt2img.run(stack, renders, on_step)]

CPU = torch.device("cpu")

# the real models' parameter counts: unet, vae, text_encoder, text_encoder_2
REAL_SIZES = {
    "sd15": (859_520_964, 83_653_863, 123_060_480),
    "sd15-inpaint": (859_535_364, 83_653_863, 123_060_480),
    "sd2": (865_910_724, 83_653_863, 340_387_840),
    "sd2-v": (865_910_724, 83_653_863, 340_387_840),
    "sd2-inpaint": (865_925_124, 83_653_863, 340_387_840),
    "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840),
    "sdxl-inpaint": (2_567_478_084, 83_653_863, 123_060_480, 694_659_840),
}
DIFFUSERS_TYPE = {"sd15": "v1", "sd15-inpaint": "inpainting", "sd2": "v2", "sd2-v": "v2",
                  "sd2-inpaint": "inpainting_v2", "sdxl": "xl_base", "sdxl-inpaint": "xl_inpaint"}


def render(index=0, seed=7, prompt="a red house", negative="blurry", steps=2, clip_skip=1):
    return Render(index=index, cell=0, checkpoint="tiny", prompt=prompt,
                  negative_prompt=negative, sampler="Euler",
                  schedule_type="Automatic", steps=steps, cfg_scale=7.0, seed=seed, width=64,
                  height=64, clip_skip=clip_skip)


def stack_of(pipe, name="test") -> Stack:
    return Stack(StackSpec(name, Path(name), "float32"), pipe, dict(pipe.scheduler.config),
                 CPU, torch.float32)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def config_only(src: Path, dst: Path) -> Path:
    """A copy of a diffusers folder without its weights: the loader must take them from the file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dst


def same_weights(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k].to(sa[k].dtype))]


# --- the shipped family configs ----------------------------------------------------------


def meta_models(family: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = families.config_folder(family)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if (folder / "text_encoder_2").is_dir():
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return models


def text_encoder_layout(family: str) -> list[tuple[str, str | None]]:
    """Each text encoder and its OpenCLIP prefix in an LDM file (None: OpenAI CLIP layout)."""
    base = families.FAMILIES[family].base
    if base == "sdxl":
        return [("text_encoder", None), ("text_encoder_2", "conditioner.embedders.1.model.")]
    return [("text_encoder", "cond_stage_model.model." if base == "sd2" else None)]


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_shipped_config_is_the_real_architecture_and_exports_to_real_ldm_keys(family):
    """Sizes match the released models; our LDM export is what diffusers itself recognises."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    models = meta_models(family)
    sizes = tuple(sum(p.numel() for p in m.parameters()) for m in models.values())
    assert sizes == REAL_SIZES[family]
    sd = ldm_export.pipeline_to_ldm(SimpleNamespace(**models))
    assert infer_diffusers_model_type(sd) == DIFFUSERS_TYPE[family]
    detected = families.detect_family(sd)
    assert detected == ("sd2" if family == "sd2-v" else family)
    unet, vae = models["unet"], models["vae"]
    assert set(convert_ldm_unet_checkpoint(sd, unet.config)) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(sd, vae.config)) == set(vae.state_dict())
    for name, prefix in text_encoder_layout(family):
        model = models[name]
        if prefix is None:
            back = convert_ldm_clip_checkpoint(sd)
        else:
            back = convert_open_clip_checkpoint(model, sd, prefix=prefix)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel
            back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert set(back) == set(model.state_dict()) - {"embeddings.position_ids"}, name
    vae_config = families.config_folder(family) / "vae" / "config.json"
    assert f'"scaling_factor": {families.FAMILIES[family].vae_scaling}' in vae_config.read_text()


def test_v_prediction_only_for_sd2_v():
    import json

    def prediction(family):
        path = families.config_folder(family) / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text())["prediction_type"]

    assert prediction("sd2-v") == "v_prediction"
    assert {prediction(f) for f in families.FAMILIES if f != "sd2-v"} == {"epsilon"}


def test_tokenizer_folders_pad_as_each_encoder_was_trained():
    from transformers import CLIPTokenizer

    def pad(family, component="tokenizer"):
        return CLIPTokenizer.from_pretrained(families.tokenizer_folder(family, component)).pad_token

    assert pad("sd15") == EOS and pad("sdxl") == EOS
    assert pad("sd2") == "!" and pad("sdxl", "tokenizer_2") == "!"
    with pytest.raises(ValueError, match="no tokenizer_2"):
        families.tokenizer_folder("sd15", "tokenizer_2")


# --- family detection on LDM-key fixtures ------------------------------------------------

UNET = "model.diffusion_model."
TO_K = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def fixture(conv_in_channels=4, context=768, sdxl=False) -> dict:
    keys = {UNET + "input_blocks.0.0.weight": (320, conv_in_channels, 3, 3),
            TO_K: (640, context),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    if sdxl:
        keys["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = (768,)
        keys["conditioner.embedders.1.model.positional_embedding"] = (77, 1280)
    else:
        keys["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = (768,)
    return keys


@pytest.mark.parametrize("keys, family", [
    (fixture(), "sd15"),
    (fixture(conv_in_channels=9), "sd15-inpaint"),
    (fixture(context=1024), "sd2"),
    (fixture(conv_in_channels=9, context=1024), "sd2-inpaint"),
    (fixture(context=2048, sdxl=True), "sdxl"),
    (fixture(conv_in_channels=9, context=2048, sdxl=True), "sdxl-inpaint"),
])
def test_detect_family_from_keys_and_shapes(keys, family):
    assert families.detect_family(keys) == family
    tensors = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    assert families.detect_family(tensors) == family


def test_detect_family_reads_only_the_header_of_a_file(tmp_path):
    keys = fixture(context=1024)
    path = tmp_path / "sd2.safetensors"
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in keys.items()}, str(path))
    assert families.detect_family(path) == "sd2"
    assert single_file.read_shapes(path) == {k: tuple(s) for k, s in keys.items()}


def test_a_vae_or_lora_is_not_a_checkpoint():
    with pytest.raises(ModelFileError, match="not a full Stable Diffusion checkpoint"):
        families.detect_family({"encoder.conv_in.weight": (128, 3, 3, 3)})


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sd15, sd15-inpaint, sd2, sd2-v"):
        families.config_folder("sd3")


# --- tiny SD1.x: the embedded model as a single file --------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory, tiny_spec):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe = StableDiffusionPipeline.from_pretrained(  # the family ships fp16; renders in fp32
        tiny_spec.path, dtype=torch.float32, local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(pipe=pipe, config=config_only(tiny_spec.path, folder / "config"),
                           file=ldm_export.save_single_file(pipe, folder / "tiny.safetensors"),
                           folder=folder)


def test_tiny_sd_single_file_loads_offline_and_renders_like_its_folder(tiny_sd):
    sd = single_file.read_state_dict(tiny_sd.file)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.",
                             "cond_stage_model.transformer.text_model.")) for k in sd)
    assert families.detect_family(tiny_sd.file) == "sd15"

    pipe = single_file.load_single_file(tiny_sd.file, config=tiny_sd.config)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(tiny_sd.pipe, name), getattr(pipe, name)) == [], name
    batch = (render(0, seed=7), render(1, seed=8, prompt="a blue tower"))
    images = txt2img_images(stack_of(pipe), batch)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert np.array_equal(pixels(images), pixels(txt2img_images(stack_of(tiny_sd.pipe), batch)))
    assert not np.array_equal(pixels(images[:1]), pixels(images[1:]))


def test_ckpt_with_training_metadata_loads_with_the_weights_only_reader(tiny_sd, tmp_path):
    sd = single_file.read_state_dict(tiny_sd.file)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, path)
    assert single_file.read_state_dict(path).keys() == sd.keys()
    pipe = single_file.load_single_file(path, family="sd15", config=tiny_sd.config)
    assert same_weights(tiny_sd.pipe.unet, pipe.unet) == []


class _Marker:
    """A pickle that runs code when loaded: it makes a folder, as an attacker's file could."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __reduce__(self):
        return (os.mkdir, (self.folder,))


def test_a_pickle_needing_code_is_refused_unless_allowed(tiny_sd, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "lightning.ckpt"
    sd = single_file.read_state_dict(tiny_sd.file)
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4),
                "callback": _Marker(marker)}, path)
    with pytest.raises(ModelFileError) as err:
        single_file.load_single_file(path, config=tiny_sd.config)
    message = str(err.value)
    assert str(path) in message and "arbitrary code execution" in message
    assert "model.allow_pickle: true" in message
    assert not marker.exists()  # refused before anything in the file ran

    pipe = single_file.load_single_file(path, config=tiny_sd.config, allow_pickle=True)
    assert marker.exists()  # the opt-in really unpickles
    assert same_weights(tiny_sd.pipe.unet, pipe.unet) == []
    marker.rmdir()
    assert families.detect_family(path, allow_pickle=True) == "sd15"  # checking the job too
    assert marker.exists()


def test_an_early_sd1_file_without_text_model_in_its_keys_loads(tiny_sd, tmp_path):
    """The first SD1 files name the CLIP parts cond_stage_model.transformer.encoder...; the
    WebUI renames them, so sdbatch does too."""
    sd = single_file.read_state_dict(tiny_sd.file)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."):
           v for k, v in sd.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    path = tmp_path / "early.safetensors"
    safetensors.torch.save_file(old, str(path))
    pipe = single_file.load_single_file(path, config=tiny_sd.config)
    assert same_weights(tiny_sd.pipe.text_encoder, pipe.text_encoder) == []


@pytest.mark.parametrize("cut", [0, 7, 0.5, -1])
def test_truncated_safetensors_names_the_file_and_says_download_again(tiny_sd, tmp_path, cut):
    data = tiny_sd.file.read_bytes()
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data[:int(len(data) * cut) if isinstance(cut, float) else cut])
    for read in (single_file.read_state_dict, single_file.load_single_file,
                 families.detect_family):
        with pytest.raises(ModelFileError) as err:
            read(path)
        assert str(path) in str(err.value)
        assert "corrupt or truncated" in str(err.value) and "download it again" in str(err.value)


def test_corrupt_safetensors_header_and_truncated_ckpt(tiny_sd, tmp_path):
    data = bytearray(tiny_sd.file.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    ckpt = tmp_path / "short.ckpt"
    torch.save({"state_dict": single_file.read_state_dict(tiny_sd.file)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    html = tmp_path / "login-page.ckpt"
    html.write_text("<html>please log in</html>")
    for path in (bad, ckpt, html):
        with pytest.raises(ModelFileError, match="corrupt or truncated.*download it again"):
            single_file.read_state_dict(path)


def test_missing_file_and_wrong_family_are_explained(tiny_sd, tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        single_file.load_single_file(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="looks like a sd15 checkpoint.*family sdxl"):
        single_file.load_single_file(tiny_sd.file, family="sdxl")
    with pytest.raises(ModelFileError, match="do not fit the sd15 config"):
        single_file.load_single_file(tiny_sd.file)  # tiny weights in the real SD1.5 shapes


# --- VAE overrides ------------------------------------------------------------------------


def test_vae_override_from_a_single_file_changes_the_image(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    other = AutoencoderKL.from_config(tiny_sd.pipe.vae.config)
    path = tmp_path / "other-vae.safetensors"
    save_file(ldm_export.vae_to_ldm(other.state_dict(), other.config), str(path))

    vae = single_file.load_vae(path, "sd15", config=tiny_sd.config)
    assert same_weights(other, vae) == [] and vae.config.scaling_factor == 0.18215
    pipe = single_file.load_single_file(tiny_sd.file, config=tiny_sd.config)
    before = pixels(txt2img_images(stack_of(pipe), (render(),)))
    pipe.vae = vae
    after = pixels(txt2img_images(stack_of(pipe), (render(),)))
    assert not np.array_equal(before, after)


def test_standalone_sdxl_vae_file_gets_the_sdxl_config(tmp_path):
    from diffusers import AutoencoderKL

    with torch.device("meta"):  # the real size; values do not matter here, only the config
        real = AutoencoderKL.from_config(AutoencoderKL.load_config(
            families.config_folder("sdxl") / "vae"))
    real.to_empty(device="cpu")
    sd = {k: v.half() for k, v in ldm_export.vae_to_ldm(real.state_dict(), real.config).items()}
    path = tmp_path / "sdxl_vae.safetensors"  # no prefix: a VAE file as people share them
    save_file(sd, str(path))
    del real, sd
    gc.collect()
    xl = single_file.load_vae(path, "sdxl")
    assert xl.config.scaling_factor == 0.13025 and xl.config.force_upcast
    assert single_file.load_vae(path, "sd15").config.scaling_factor == 0.18215


def test_vae_override_from_a_diffusers_folder_takes_the_family_scale(tiny_sd, tmp_path):
    tiny_sd.pipe.vae.save_pretrained(tmp_path / "vae-folder")
    vae = single_file.load_vae(tmp_path / "vae-folder", "sdxl")
    assert vae.config.scaling_factor == 0.13025
    assert same_weights(tiny_sd.pipe.vae, vae) == []
    lora = tmp_path / "lora-like.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelFileError, match="not a VAE"):
        single_file.load_vae(lora, "sd15")


# --- tiny SDXL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-xl")
    pipe = build_tiny_sdxl(folder)
    pipe.save_pretrained(folder / "saved")
    return SimpleNamespace(pipe=pipe, config=config_only(folder / "saved", folder / "config"),
                           file=ldm_export.save_single_file(pipe, folder / "tiny-xl.safetensors"))


def test_tiny_sdxl_single_file_loads_offline_with_both_encoders(tiny_xl):
    sd = single_file.read_state_dict(tiny_xl.file)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in sd)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sd
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (64, 24)  # OpenCLIP way
    assert families.detect_family(tiny_xl.file) == "sdxl"

    pipe = single_file.load_single_file(tiny_xl.file, config=tiny_xl.config)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(tiny_xl.pipe, name), getattr(pipe, name)) == [], name
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.tokenizer_2.pad_token == "!"


def test_sdxl_conditioning_matches_diffusers_own_prompt_encoding(tiny_xl):
    """Penultimate layers of both encoders, pooled from the second's projection, zeros for an
    empty negative: the same tensors as StableDiffusionXLPipeline.encode_prompt."""
    pipe = tiny_xl.pipe
    for negative in ("blurry, lowres", ""):
        renders = (render(0, prompt="a red house", negative=negative),
                   render(1, prompt="a tower at night", negative=negative))
        ours = conds(pipe, renders)
        theirs = pipe.encode_prompt(  # diffusers zeroes the negative when it is None
            prompt=[r.prompt for r in renders], device=CPU, do_classifier_free_guidance=True,
            negative_prompt=[r.negative_prompt for r in renders] if negative else None)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                 "negative_pooled_prompt_embeds")
        for name, expected in zip(names, theirs, strict=True):
            assert torch.allclose(ours[name], expected, atol=1e-6), (negative, name)
    assert ours["prompt_embeds"].shape == (2, 77, 96)  # 32 + 64 wide: both encoders
    assert ours["pooled_prompt_embeds"].shape == (2, 24)


def test_sdxl_and_sd2_take_their_penultimate_layer_whatever_the_clip_skip(tiny_xl, tiny_sd):
    """The WebUI applies no clip skip to SDXL (trained on both encoders' penultimate layer)
    nor to SD2's OpenCLIP (whose config already ends at it)."""
    def embeds(pipe, clip_skip):
        r = (render(clip_skip=clip_skip),)
        return conds(pipe, r)["prompt_embeds"]

    assert torch.equal(embeds(tiny_xl.pipe, 1), embeds(tiny_xl.pipe, 2))
    assert torch.equal(embeds(tiny_xl.pipe, 1), embeds(tiny_xl.pipe, 3))
    sd1 = tiny_sd.pipe
    assert not torch.allclose(embeds(sd1, 1), embeds(sd1, 2))  # SD1's CLIP-L does skip
    width = sd1.text_encoder.config.hidden_size
    sd1.text_encoder.config.hidden_size = 1024  # as SD2's OpenCLIP ViT-H
    try:
        assert torch.equal(embeds(sd1, 1), embeds(sd1, 2))
    finally:
        sd1.text_encoder.config.hidden_size = width


def test_sdxl_empty_negative_is_zeroed_per_image_not_per_batch(tiny_xl):
    mixed = (render(0, negative=""), render(1, negative="blurry"))
    cond = conds(tiny_xl.pipe, mixed)
    assert not cond["negative_prompt_embeds"][0].any()
    assert cond["negative_prompt_embeds"][1].any()
    assert cond["negative_pooled_prompt_embeds"][1].any()


def conds(pipe, renders):
    """Each render's prompt and negative as the stage encodes them, named as diffusers'
    encode_prompt names them."""
    def encoded(text: str, clip_skip: int, negative: bool):
        return txt2img.encode_text(pipe, txt2img.clean_text(pipe, text), clip_skip, CPU,
                                   torch.float32, negative=negative)

    pos = [encoded(r.prompt, r.clip_skip, False) for r in renders]
    neg = [encoded(r.negative_prompt, r.clip_skip, True) for r in renders]
    out = {"prompt_embeds": torch.cat([e for e, _ in pos]),
           "negative_prompt_embeds": torch.cat([e for e, _ in neg])}
    if pos[0][1] is not None:  # SDXL's pooled embeddings
        out |= {"pooled_prompt_embeds": torch.cat([p for _, p in pos]),
                "negative_pooled_prompt_embeds": torch.cat([p for _, p in neg])}
    return out


def test_tiny_sdxl_renders_from_its_single_file_like_the_original(tiny_xl):
    pipe = single_file.load_single_file(tiny_xl.file, config=tiny_xl.config)
    batch = (render(0, seed=3), render(1, seed=4, negative=""))
    images = txt2img_images(stack_of(pipe), batch)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    # identical weights and conditioning; a weight loaded from a converted state dict may sit
    # in memory differently from the built one, which moves a pixel by a level at most
    original = pixels(txt2img_images(stack_of(tiny_xl.pipe), batch)).astype(int)
    assert np.abs(pixels(images).astype(int) - original).max() <= 1
    alone = txt2img_images(stack_of(pipe), batch[1:])  # per-image noise: batch does not matter
    assert np.abs(pixels(alone)[0].astype(int) - pixels(images)[1].astype(int)).max() <= 1


def test_sdxl_size_conditioning_reaches_the_unet(tiny_xl, monkeypatch):
    seen = {}
    real = tiny_xl.pipe.unet.forward

    def spy(*args, added_cond_kwargs=None, **kwargs):
        seen.update(added_cond_kwargs)
        return real(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(tiny_xl.pipe.unet, "forward", spy)
    r = render(steps=1)
    txt2img_images(stack_of(tiny_xl.pipe), (r,))
    assert seen["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    assert seen["text_embeds"].shape == (2, 24)  # negative + positive pooled


# --- the real SD1.5 architecture ------------------------------------------------------------


@pytest.mark.slow
def test_real_sd15_shapes_load_offline_from_the_shipped_config(tmp_path):
    """A random-weight checkpoint in the released SD1.5 shapes (fp16, ~2 GB) loads through the
    shipped config alone and renders; only a few sample weights are kept for comparison."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    start = time.perf_counter()
    folder = families.config_folder("sd15")
    torch.manual_seed(0)
    with torch.no_grad():
        models = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")).half(),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).half(),
            text_encoder=CLIPTextModel(
                CLIPTextConfig.from_pretrained(folder / "text_encoder")).half())
    samples = {
        ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"): None,
        ("unet", "conv_in.weight"): None,
        ("vae", "decoder.mid_block.attentions.0.to_q.weight"): None,
        ("text_encoder", "encoder.layers.11.self_attn.v_proj.weight"): None,
    }
    for name, key in samples:
        samples[name, key] = getattr(models, name).state_dict()[key].clone()
    path = ldm_export.save_single_file(models, tmp_path / "sd15-random.safetensors")
    del models
    gc.collect()
    built = time.perf_counter()
    assert 1.9e9 < path.stat().st_size < 2.2e9

    assert families.detect_family(path) == "sd15"
    pipe = single_file.load_single_file(path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor == 0.18215
    for (name, key), value in samples.items():
        assert torch.equal(getattr(pipe, name).state_dict()[key], value.float()), key
    images = txt2img_images(stack_of(pipe), (render(steps=2),))
    assert images[0].size == (64, 64)
    print(f"\nreal SD1.5 shapes: built+saved {built - start:.1f}s, "
          f"loaded+rendered {time.perf_counter() - built:.1f}s")


def test_sdxl_hires_fix_that_crops_its_cover_is_conditioned_on_the_cover(tiny_xl,
                                                                        monkeypatch):
    """64x96 to resize 96x96 covers at 96x144 and crops 6 latent rows: the WebUI tells SDXL
    the cover's size (hr_upscale_to), and the pass renders 96x96."""
    from sdbatch import matrix
    from sdbatch.plan import make_plan
    from sdbatch.schema import validate
    from sdbatch.stages import hires_fix
    from sdbatch.stages.common import Item

    job = validate({"prompt": "a red house", "params": {"sampler": "Euler", "steps": 2,
                                                        "seed": 5, "width": 64, "height": 96},
                    "post": [{"hires_fix": {"resize_x": 96, "resize_y": 96, "steps": 2,
                                            "denoise": 0.5}}]})
    [r] = matrix.expand(matrix.resolve_seeds(job, 0))
    plan = make_plan([r], {"tiny": "xl"}, 1, {}, {})
    stack = stack_of(tiny_xl.pipe)
    [base] = txt2img.run(stack, (r,))
    told, real = [], stack.pipe.unet.forward

    def spy(*args, added_cond_kwargs=None, **kwargs):
        told.append(added_cond_kwargs["time_ids"][0].tolist())
        return real(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(stack.pipe.unet, "forward", spy)
    [big] = hires_fix.run(stack, [Item(r, plan.chains[0][1].params, base)])
    assert big.image.size == (96, 96)
    assert told and all(t == [144, 96, 0, 0, 144, 96] for t in told)


def test_sdxl_post_steps_hires_and_inpaint(tiny_xl, tmp_path):
    """The post-step stages on SDXL: encode/decode through its VAE, size conditioning at the
    second pass's size."""
    from PIL import Image as PILImage

    from sdbatch import matrix
    from sdbatch.plan import InputImage, make_plan
    from sdbatch.schema import validate
    from sdbatch.stages import hires_fix, inpaint
    from sdbatch.stages.common import Item

    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    PILImage.fromarray(mask).save(tmp_path / "m.png")
    job = validate({"prompt": "a red house", "params": {"sampler": "Euler", "steps": 2,
                                                        "seed": 5, "width": 64, "height": 64},
                    "post": [{"hires_fix": {"scale": 1.5, "steps": 2, "denoise": 0.5}},
                             {"inpaint": {"mask": str(tmp_path / "m.png"), "steps": 2}}]})
    [r] = matrix.expand(matrix.resolve_seeds(job, 0))
    plan = make_plan([r], {"tiny": "xl"}, 1, {}, {str(tmp_path / "m.png"):
                                                  InputImage("x", (64, 64))})
    stack = stack_of(tiny_xl.pipe)
    [base] = txt2img.run(stack, (r,))
    [big] = hires_fix.run(stack, [Item(r, plan.chains[0][1].params, base)])
    assert big.image.size == (96, 96) and big.latents.shape[1:] == (12, 12)
    [painted] = inpaint.run(stack, [Item(r, plan.chains[0][2].params, big)])
    before, after = np.asarray(big.image), np.asarray(painted.image)
    far = np.ones((96, 96), bool)
    far[4:92, 4:92] = False  # the mask blurred at its 64 px (6..58), resized to 96 px
    assert np.array_equal(after[far], before[far])
