"""The infotext reads back into the WebUI as the same recipe; embeddings trigger as in the
WebUI; a random dynamic prompt reproduces from the PNG alone."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest
import torch

from sdbatch import __version__, matrix, model_specs
from sdbatch import run as runner
from sdbatch.models import embeddings, hashing, hypernetwork, lora, stack, tiny
from sdbatch.output import png, records
from sdbatch.prompts.triggers import triggered, words
from sdbatch.reproduce import reproduce
from sdbatch.schema import validate


def run_job(raw: dict, folder: Path) -> int:
    raw = {**raw, "run": {"dir": str(folder), "progress": "quiet"}}
    return runner.run(validate(raw), lambda key: "test", [], ["test"])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lora_hash(path: Path) -> str:
    """The WebUI's "Lora hashes" value: sha256 of the safetensors bytes after the header."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + size:]).hexdigest()[:12]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_spec) -> Path:
    """An A1111 models folder: a second LoRA, a hypernetwork, a VAE, an embedding no prompt
    names."""
    folder = tmp_path_factory.mktemp("models")
    pipe = stack.load(tiny_spec, torch.device("cpu")).pipe
    lora.write_kohya_lora(folder / "Lora" / "detail.safetensors", pipe.unet, pipe.text_encoder,
                          seed=1)
    (folder / "hypernetworks").mkdir()
    hypernetwork.write_a1111_hypernetwork(folder / "hypernetworks" / "hn.pt", 64, seed=5)
    shutil.copytree(tiny.model_folder() / "vae", folder / "VAE" / "tinyvae")
    embeddings.write_a1111_embedding(folder / "embeddings" / "blurryface.pt",
                                     torch.randn(1, 64, generator=torch.Generator().manual_seed(3)))
    return folder


def every_feature(models: Path) -> dict:
    return {
        "paths": {"models": str(models)},
        "model": {"checkpoint": "tiny", "vae": "tinyvae",
                  "loras": [{"name": "LegoAlrev", "weight": 0.8}],
                  "hypernetworks": [{"name": "hn", "weight": 0.5}]},
        "prompt": "a red house, nightsky <lora:detail:0.5>",
        "negative_prompt": "blurry",
        "params": {"sampler": "DPM2 a", "schedule_type": "Karras", "steps": 3, "cfg_scale": 7,
                   "seed": 11, "width": 64, "height": 64, "clip_skip": 2, "subseed": 5,
                   "subseed_strength": 0.3, "seed_resize_from_w": 48,
                   "seed_resize_from_h": 48, "ensd": 31337},
    }


def test_golden_infotext_with_every_feature(models, tmp_path):
    assert run_job(every_feature(models), tmp_path / "r") == 0
    [image] = (tmp_path / "r/images").glob("*.png")
    family = tiny.family_models()
    model_hash = hashing.model_hash(tiny.model_folder())  # a folder: no WebUI hash
    vae_hash = hashing.model_hash(models / "VAE" / "tinyvae")
    # Written by hand from AUTOMATIC1111 stable-diffusion-webui v1.10, modules/processing.py
    # create_infotext: Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash,
    # Model, VAE hash, VAE, Variation seed, Variation seed strength, Seed resize from, Clip
    # skip, ENSD (DPM2 a "uses_ensd"), RNG, then p.extra_generation_params in the order they
    # are set (Lora hashes in extra_networks_lora.activate, TI hashes in sd_hijack_clip's
    # forward), then Version. Stack networks appear as tags appended to the prompt, as the
    # WebUI's own "add network to prompt" settings append them.
    expected = (
        "a red house, nightsky <lora:detail:0.5><lora:LegoAlrev:0.8><hypernet:hn:0.5>\n"
        "Negative prompt: blurry\n"
        "Steps: 3, Sampler: DPM2 a, Schedule type: Karras, CFG scale: 7, Seed: 11, "
        f"Size: 64x64, Model hash: {model_hash}, Model: tiny, VAE hash: {vae_hash}, "
        "VAE: tinyvae, Variation seed: 5, Variation seed strength: 0.3, "
        "Seed resize from: 48x48, Clip skip: 2, ENSD: 31337, RNG: CPU, "
        f'Lora hashes: "detail: {lora_hash(models / "Lora/detail.safetensors")}, '
        f'LegoAlrev: {lora_hash(family / "Lora/LegoAlrev.safetensors")}", '
        f'TI hashes: "nightsky: {sha(family / "embeddings/nightsky.pt")[:12]}", '
        f"Version: sdbatch {__version__}")
    text = png.read_text(image)["parameters"]
    for got, want in zip(text.split(", "), expected.split(", "), strict=False):
        assert got == want  # field by field: the first that differs is named
    assert text == expected


def render_of(raw: dict) -> matrix.Render:
    return matrix.expand(matrix.resolve_seeds(validate(raw), 0))[0]


def test_a_network_named_both_ways_is_applied_once_with_the_tag_weight():
    r = render_of({"model": {"loras": [{"name": "LegoAlrev", "weight": 0.8}]},
                   "prompt": "a house <lora:LegoAlrev.safetensors:0.3>", "params": {"seed": 1}})
    assert r.loras == (("LegoAlrev.safetensors", 0.3),)
    assert records.infotext_prompt(r) == "a house <lora:LegoAlrev.safetensors:0.3>"


def split_infotext(tiny_spec, raw: dict) -> tuple[matrix.Render, str, dict]:
    from sdbatch.output.infotext import parse_infotext
    from sdbatch.plan import make_plan

    r = render_of({"params": {"seed": 1, "steps": 2, "width": 64, "height": 64}, **raw})
    hashes = {("lora", n): h for n, h in (("LegoAlrev", "aaaaaaaaaaaa"),
                                         ("detail", "bbbbbbbbbbbb"), ("locon", "cccccccccccc"))}
    plan = make_plan([r], {"tiny": "x"}, 1, networks=hashes)
    prompt, _, params = parse_infotext(records.infotext(r, {"tiny": tiny_spec}, plan.chains[0]))
    return r, prompt, params


def test_split_and_lyco_tags_go_into_the_infotext_as_written(tiny_spec):
    r, prompt, params = split_infotext(tiny_spec, {
        "model": {"loras": [{"name": "LegoAlrev", "weight": 0.8, "unet_weight": 0.5}]},
        "prompt": "a house <lora:detail:te=0.2:unet=1> <lyco:locon:0.7>"})
    assert r.loras == (("LegoAlrev", (0.8, 0.5)), ("detail", (0.2, 1.0)), ("locon", 0.7))
    # the prompt's tags as the user wrote them; model.loras' appended in the WebUI's
    # positional form <lora:name:te:unet>
    assert prompt == "a house <lora:detail:te=0.2:unet=1> <lyco:locon:0.7><lora:LegoAlrev:0.8:0.5>"
    assert params["Lora hashes"] == ("detail: bbbbbbbbbbbb, locon: cccccccccccc, "
                                     "LegoAlrev: aaaaaaaaaaaa")


def test_model_loras_with_equal_split_weights_write_one_number(tiny_spec):
    r, prompt, _ = split_infotext(tiny_spec, {
        "model": {"loras": [{"name": "LegoAlrev", "te_weight": 0.6, "unet_weight": 0.6}]},
        "prompt": "a house"})
    assert r.loras == (("LegoAlrev", 0.6),) and prompt == "a house<lora:LegoAlrev:0.6>"


def test_content_keys_follow_each_part_weight():
    from sdbatch.plan import make_plan

    def key(lora: dict) -> str:
        r = render_of({"model": {"loras": [{"name": "LegoAlrev", **lora}]}, "prompt": "a house",
                       "params": {"seed": 1}})
        return make_plan([r], {"tiny": "x"}, 1).key(0)

    whole = key({"weight": 0.8})
    assert key({"weight": 0.8, "te_weight": 0.8, "unet_weight": 0.8}) == whole  # same render
    te = key({"weight": 0.8, "te_weight": 0.5})
    unet = key({"weight": 0.8, "unet_weight": 0.5})
    assert len({whole, te, unet, key({"weight": 0.8, "te_weight": 0.4})}) == 4


def test_lora_tags_that_cannot_be_applied_are_refused_before_any_work():
    job = validate({"prompt": ["a <lora:LegoAlrev:1:1:8>", "b <lyco:LegoAlrev:x>"],
                    "params": {"seed": 1}})
    renders = matrix.expand(matrix.resolve_seeds(job, 0))
    _, found = model_specs.resolve_networks(job, renders)
    assert [p.key for p in found] == ["prompt", "prompt"]
    assert "dyn" in found[0].message and "not a number" in found[1].message


@pytest.mark.parametrize(("sampler", "eta", "ensd", "want"), [
    ("Euler a", None, 7, {"ENSD": "7"}),
    ("DPM++ 2M", None, 7, {}),  # no later noise: the WebUI writes no ENSD
    ("DPM++ SDE", None, 7, {}),  # Brownian noise: not "uses_ensd" either
    ("DDIM", 0.5, 7, {"Eta DDIM": "0.5"}),  # DDIM is not "uses_ensd"
    ("DDIM", 0.0, 0, {}),  # eta at DDIM's default is not written
])
def test_ensd_and_eta_only_where_the_webui_writes_them(tiny_spec, sampler, eta, ensd, want):
    from sdbatch.output.infotext import parse_infotext
    from sdbatch.plan import make_plan

    r = render_of({"prompt": "a house", "params": {"sampler": sampler, "eta": eta, "ensd": ensd,
                                                   "seed": 1}})
    plan = make_plan([r], {"tiny": "x"}, 1)
    _, _, params = parse_infotext(records.infotext(r, {"tiny": tiny_spec}, plan.chains[0]))
    assert {k: params[k] for k in ("ENSD", "Eta DDIM", "Eta") if k in params} == want
    assert params["RNG"] == "CPU" and "Hypernet" not in params


def test_trigger_rule_is_whole_clip_words():
    assert words("(EasyNegative:1.2), x") == ("(", "easynegative", ":", "1", ".", "2", "),", "x")
    names = ["easynegative", "bad_prompt", "bad"]
    assert triggered(["EasyNegative, blurry"], names) == ("easynegative",)
    assert triggered(["(easynegative:1.2)"], names) == ("easynegative",)
    assert triggered(["easynegatives", "easy negative", "easy(negative)"], names) == ()
    assert triggered(["bad_prompt"], names) == ("bad_prompt",)  # the longest name wins
    assert triggered(["bad prompt"], names) == ("bad",)
    assert triggered(["bad _ prompt"], names) == ("bad_prompt",)  # CLIP's tokens are the same


def test_every_embedding_in_the_folder_triggers_and_only_used_ones_load(models):
    raw = {"paths": {"models": str(models)}, "prompt": ["a red house", "a house, BlurryFace"],
           "negative_prompt": "nightsky", "params": {"seed": 1}}
    job = matrix.resolve_seeds(validate(raw), 0)
    renders = matrix.expand(job)
    assert [r.embeddings for r in renders] == [("nightsky",), ("blurryface", "nightsky")]
    spec, problems = model_specs.resolve(job.model, job.paths, "tiny")
    assert not problems and spec.embeddings == ()
    used = model_specs.with_embeddings({"tiny": spec}, renders[:1], job)["tiny"]
    assert used.embeddings == (tiny.family_models() / "embeddings/nightsky.pt",)
    both = model_specs.with_embeddings({"tiny": spec}, renders, job)["tiny"]
    assert {p.name for p in both.embeddings} == {"nightsky.pt", "blurryface.pt"}
    assert used.identity != both.identity != spec.identity  # content keys follow them


def test_random_dynamic_prompt_reproduces_without_its_wildcard_file(tmp_path):
    wildcards = tmp_path / "wildcards"
    wildcards.mkdir()
    (wildcards / "colour.txt").write_text("red\nblue\nyellow\nwhite\npurple\n")
    raw = {"prompt": "a __colour__ house", "dynamic_prompts": {"mode": "random"},
           "paths": {"wildcards": str(wildcards)},
           "params": {"sampler": "Euler", "steps": 2, "seed": 3, "batch_count": 4,
                      "width": 64, "height": 64}}
    assert run_job(raw, tmp_path / "r") == 0
    images = sorted((tmp_path / "r/images").glob("*.png"))
    prompts = [png.read_recipe(i)["recipe"]["params"]["prompt"] for i in images]
    assert len(set(prompts)) > 1 and "__" not in "".join(prompts)
    shutil.rmtree(wildcards)
    out = tmp_path / "again.png"
    assert reproduce(images[-1], out)
    assert png.read_recipe(out)["recipe"]["params"]["prompt"] == prompts[-1]


@pytest.mark.parametrize("path", ["/data/loras/add_detail.safetensors",
                                  "C:\\loras\\styles\\add_detail.safetensors"])
def test_a_lora_given_by_path_is_named_by_its_file_in_the_infotext(tiny_spec, path):
    """The WebUI knows a LoRA by its file's stem: a path in the tag would not resolve there,
    and a drive's ':' would break the tag."""
    from sdbatch.output.infotext import parse_infotext
    from sdbatch.plan import make_plan

    r = render_of({"params": {"seed": 1, "steps": 2, "width": 64, "height": 64},
                   "model": {"loras": [{"name": path, "weight": 0.6}]}, "prompt": "a house"})
    plan = make_plan([r], {"tiny": "x"}, 1, networks={("lora", path): "dddddddddddd"})
    prompt, _, params = parse_infotext(records.infotext(r, {"tiny": tiny_spec}, plan.chains[0]))
    assert prompt == "a house<lora:add_detail:0.6>"
    assert params["Lora hashes"] == "add_detail: dddddddddddd"


def post_infotext(tiny_spec, post: list[dict]) -> dict:
    from sdbatch.output.infotext import parse_infotext
    from sdbatch.plan import InputImage, make_plan

    r = render_of({"params": {"seed": 1, "steps": 2, "width": 64, "height": 64},
                   "post": post})
    plan = make_plan([r], {"tiny": "x"}, 1, inputs={"m.png": InputImage("ab" * 32, (64, 64))})
    return parse_infotext(records.infotext(r, {"tiny": tiny_spec}, plan.chains[0]))[2]


def test_denoising_strength_beside_hires_keys_is_the_hires_fixs(tiny_spec):
    """The WebUI reads it as the hires fix's where Hires keys are: a later pass's would
    make a pasted recipe's hires fix at another strength."""
    params = post_infotext(tiny_spec, [{"hires_fix": {"scale": 2, "denoise": 0.25}},
                                       {"sd_upscale": {"denoise": 0.4}}])
    assert params["Denoising strength"] == "0.25" and params["Hires upscale"] == "2"
    params = post_infotext(tiny_spec, [{"img2img": {"denoise": 0.3}},
                                       {"sd_upscale": {"denoise": 0.4}}])
    assert params["Denoising strength"] == "0.4"  # without a hires fix: the last pass's


def test_an_inverted_mask_writes_the_webuis_mask_mode(tiny_spec):
    params = post_infotext(tiny_spec, [{"inpaint": {"mask": "m.png", "invert_mask": True,
                                                    "mask_blur": 0}}])
    assert params["Mask mode"] == "Inpaint not masked"
    assert "Mask blur" not in params  # the WebUI writes it only above 0
    params = post_infotext(tiny_spec, [{"inpaint": {"mask": "m.png", "mask_blur": 4}}])
    assert "Mask mode" not in params and params["Mask blur"] == "4"


def test_a_beta_schedule_writes_its_alpha_and_beta(tiny_spec):
    from sdbatch.output.infotext import parse_infotext
    from sdbatch.plan import make_plan

    for schedule, want in (("Beta", {"Beta schedule alpha": "0.6", "Beta schedule beta": "0.6"}),
                           ("Karras", {})):
        r = render_of({"prompt": "a house", "params": {"sampler": "Euler", "seed": 1,
                                                       "schedule_type": schedule}})
        plan = make_plan([r], {"tiny": "x"}, 1)
        params = parse_infotext(records.infotext(r, {"tiny": tiny_spec}, plan.chains[0]))[2]
        assert {k: v for k, v in params.items() if k.startswith("Beta")} == want


def test_a_vae_file_is_written_by_its_file_name_as_the_webui_does(tiny_spec, tmp_path):
    """get_loaded_vae_name is the file's basename: pasted back, it selects that VAE."""
    import dataclasses

    from sdbatch.output.infotext import parse_infotext
    from sdbatch.plan import make_plan

    vae = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    vae.write_bytes(b"vae")
    r = render_of({"prompt": "a house", "params": {"seed": 1}})
    spec = dataclasses.replace(tiny_spec, vae=vae)
    plan = make_plan([r], {"tiny": "x"}, 1)
    _, _, params = parse_infotext(records.infotext(r, {"tiny": spec}, plan.chains[0]))
    assert params["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors"
