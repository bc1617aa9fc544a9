"""The tiny family's training recipe: its scenes say what they draw, and a few steps of every
part write files that load through the ordinary paths. The shipped weights are never
retrained here."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdbatch.tiny_train import scenes, train
from sdbatch.tiny_train.__main__ import main, parse_steps
from sdbatch.tiny_train.vocab import write_tokenizer

STEPS = {"vae": 4, "unet": 4, "lora": 3, "ti": 3, "controlnet": 4}  # 4: one at hires_size
SMALL = ["vae_batch=4", "pool=64", "unet_batch=4", "lora_pool=16", "lora_batch=4",
         "ti_batch=4", "hires_pool=8", "controlnet_pool=8", "controlnet_hires_pool=2",
         "controlnet_batch=4"]


def nearest_colour(pixels: np.ndarray, palette: dict) -> np.ndarray:
    names = list(palette)
    ref = np.array([palette[n] for n in names], np.float32)
    d = ((pixels[:, None, :].astype(np.float32) - ref[None]) ** 2).sum(-1)
    return np.array(names)[d.argmin(1)]


# --- scenes -------------------------------------------------------------------------------


@pytest.mark.parametrize("style", scenes.STYLES)
@pytest.mark.parametrize("colour", list(scenes.COLOURS))
def test_named_colour_dominates_the_building(colour, style):
    rng = random.Random(colour)
    palette = scenes.SATURATED if style == "legoalrev" else scenes.COLOURS
    for _ in range(12):
        scene = scenes.random_scene(rng, colour=colour, sky="blue")
        drawn = scenes.draw(scene, style=style)
        wall = drawn.image[drawn.masks["building"]]
        share = (nearest_colour(wall, palette) == colour).mean()
        assert share > 0.6, (scene, share)
        subject = scenes.caption(scene, random.Random(1)).split(",")[0]
        assert colour in subject.split() or not any(c in subject for c in scenes.COLOURS)


def test_position_moves_the_building():
    rng = random.Random(3)
    for position, (lo, hi) in {"left": (0, 0.4), "centre": (0.35, 0.65),
                               "right": (0.6, 1)}.items():
        for _ in range(10):
            scene = scenes.random_scene(rng)
            scene = scenes.Scene(**{**scene.asdict(), "position": position})
            xs = np.nonzero(scenes.draw(scene).masks["building"])[1]
            assert lo * 64 <= xs.mean() <= hi * 64, (position, xs.mean())


def test_skies_and_studs_are_what_the_caption_says():
    rng = random.Random(4)
    brightness = {}
    for sky in scenes.SKIES:
        values = []
        for _ in range(10):
            drawn = scenes.draw(scenes.random_scene(rng, sky=sky, lego=0.5))
            values.append(drawn.image[drawn.masks["sky"]].mean())
        brightness[sky] = np.mean(values)
    assert brightness["night"] < 60 < brightness["blue"]
    orange = scenes.draw(scenes.random_scene(rng, sky="orange"))
    r, _, b = orange.image[orange.masks["sky"]].mean(0)
    assert r > b + 60
    for _ in range(20):
        scene = scenes.random_scene(rng, lego=0.5)
        drawn = scenes.draw(scene)
        assert drawn.masks["studs"].any() == scene.lego
        assert ("lego" in scenes.caption(scene, random.Random(0))) == scene.lego


def test_legoalrev_look_adds_studs_and_a_baseplate():
    scene = scenes.Scene(colour="blue", storeys=3, wide=True, lego=False, flowers=False, seed=9)
    plain, lego = scenes.draw(scene), scenes.draw(scene, style="legoalrev")
    assert not plain.masks["studs"].any() and lego.masks["studs"].sum() > 20
    lawn = plain.masks["lawn"] & lego.masks["lawn"]
    assert lego.image[lawn].std(0).mean() > plain.image[lawn].std(0).mean() + 10
    assert np.array_equal(lego.masks["baseplate"], lego.masks["lawn"])


def test_baseplate_studs_repeat_in_every_8x8_cell():
    """Each latent pixel of the VAE covers 8x8 pixels; on a fixed grid the studs are one
    pattern per cell, which an 8x VAE learns to draw (off-grid, it blurs them away)."""
    for seed in (1, 2, 3):
        drawn = scenes.draw(scenes.Scene(seed=seed), style="legoalrev")
        cells = [drawn.image[y:y + 8, x:x + 8] for y in range(48, 64, 8) for x in range(8, 56, 8)
                 if drawn.masks["baseplate"][y:y + 8, x:x + 8].all()]
        assert cells and all(np.array_equal(c, cells[0]) for c in cells)


def test_scenes_depend_on_the_seed_alone():
    a, texts_a, scenes_a = scenes.batch(5, 16, empty=0.2)
    b, texts_b, _ = scenes.batch(5, 16, empty=0.2)
    assert np.array_equal(a, b) and texts_a == texts_b
    assert not np.array_equal(a, scenes.batch(6, 16)[0])
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert scenes.draw(scenes_a[0], size=128).image.shape == (128, 128, 3)


def test_every_caption_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path, scenes.vocabulary())
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert all(len(tok.tokenize(w)) == 1 for w in scenes.vocabulary())
    _, texts, _ = scenes.batch(1, 200, trigger="LegoAlrev")
    assert max(len(tok(t).input_ids) for t in texts) < 60  # never truncated at 77
    odd = "Zürich, 42 ünknown wörds!"
    back = tok.decode(tok(odd).input_ids, skip_special_tokens=True)  # CLIP spaces word ends
    assert back.replace(" ", "") == odd.lower().replace(" ", "")


# --- training -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sdbatch_cache):
    """A few steps of every part, through the command line as the lead would run it."""
    out = tmp_path_factory.mktemp("tiny-train")
    steps = ",".join(f"{k}={v}" for k, v in STEPS.items())
    # one thread: two threads on two busy cores run several times slower
    assert main(["--out", str(out), "--steps", steps, "--threads", "1", "--no-samples",
                 "--set", *SMALL]) == 0
    return out, json.loads((out / "train_settings.json").read_text())


def test_short_training_records_what_made_it(trained):
    out, record = trained
    report = record["report"]
    for part in train.PARTS:
        assert report[part]["steps"] == report[part]["steps_done"] == STEPS[part]
        assert np.isfinite(report[part]["final_loss"])
    assert record["settings"]["seed"] == 0 and record["versions"]["torch"]
    assert "--steps vae=4,unet=4,lora=3,ti=3,controlnet=4" in record["command"]
    assert "pool=64" in record["command"]
    assert sum(record["sizes_bytes"].values()) < 30e6


def test_trained_folder_loads_and_renders_through_the_stack(trained):
    from safetensors import safe_open

    from sdbatch.models.stack import StackSpec, load

    out, record = trained
    fp16 = record["report"]["fp16"]
    assert fp16["unet"]["fp16"] and fp16["text_encoder"]["fp16"]
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        with safe_open(str(out / "tiny" / part / f"{name}.safetensors"), "pt") as f:
            key = next(iter(f.keys()))
            want = torch.float16 if fp16[part]["fp16"] else torch.float32
            assert f.get_tensor(key).dtype == want
            if part == "text_encoder":
                assert key.startswith("text_model.")
    stack = load(StackSpec("tiny", out / "tiny"), torch.device("cpu"))
    assert stack.dtype == torch.float32 and stack.pipe.unet.dtype == torch.float32
    images = train.render(stack.pipe, ["a red house", "a blue tower"], seed=3, steps=3)
    assert images.shape == (2, 64, 64, 3)
    again = train.render(stack.pipe, ["a red house", "a blue tower"], seed=3, steps=3)
    assert np.array_equal(images, again)


def test_controlnet_is_trained_in_the_same_run_against_its_tiny(trained):
    """control_tiny_canny beside the other parts, for the UNet this run made, after the
    fixed --steps count; its own record replays it with the standalone command."""
    from sdbatch.models import controlnet, tiny
    from sdbatch.tiny_train.controlnet import NAME

    out, record = trained
    path = out / "ControlNet" / f"{NAME}.safetensors"
    assert record["sizes_bytes"][f"ControlNet/{NAME}.safetensors"] == path.stat().st_size
    config = json.loads((out / "tiny" / "unet" / "config.json").read_text())
    assert controlnet.misfit(path, config, "tiny") is None
    copy = controlnet.load(path, config, torch.float32).conv_in.weight
    ours = train.load_shipped(out / "tiny").unet.conv_in.weight  # its start: a few steps away
    shipped = train.load_shipped(tiny.model_folder()).unet.conv_in.weight
    assert (copy - ours).abs().max() < 0.01 < (copy - shipped).abs().max()
    saved = json.loads((out / "ControlNet" / f"{NAME}.json").read_text())
    assert saved["steps"] == saved["steps_done"] == record["report"]["controlnet"]["steps"] == 4
    assert f"--family {out} --out {out}" in saved["command"]
    assert "--pool 8 --hires-pool 2 --steps 4 --set controlnet_batch=4" in saved["command"]


def test_lora_file_is_kohya_and_loads_in_diffusers(trained):
    from safetensors.torch import load_file

    out, _ = trained
    path = out / "Lora" / "LegoAlrev.safetensors"
    tensors = load_file(path)
    names = {k.split(".")[0] for k in tensors}
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_")) for n in names)
    assert any(n.startswith("lora_te_") for n in names)
    for n in names:
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= set(tensors)

    pipe = train.load_shipped(out / "tiny")
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        before = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(str(path), adapter_name="x")
        on = pipe.unet(x, t, c).sample
        pipe.set_adapters(["x"], adapter_weights=[0.0])
        off = pipe.unet(x, t, c).sample
    assert not torch.equal(on, before)
    assert torch.allclose(off, before, atol=1e-6)


def test_embedding_is_a1111_and_loads_in_diffusers(trained):
    out, record = trained
    path = out / "embeddings" / "nightsky.pt"
    data = torch.load(path, weights_only=True)
    assert data["name"] == "nightsky" and data["step"] == 3
    assert data["string_to_token"] == {"*": 265}
    assert data["string_to_param"]["*"].shape == (1, 64)
    assert record["report"]["ti"]["check"]["error"] < 1e-4
    pipe = train.load_shipped(out / "tiny")
    pipe.load_textual_inversion(str(path))
    assert pipe.tokenizer.convert_tokens_to_ids("nightsky") == len(pipe.tokenizer) - 1


def test_a_budget_of_seconds_trains_every_part_on_the_clock(tmp_path):
    """--minutes 0.5 is all reserve: each part, the ControlNet too, runs its calibration
    steps on the clock, and the record replays those counts."""
    assert main(["--out", str(tmp_path), "--minutes", "0.5", "--threads", "1", "--no-samples",
                 "--set", *SMALL]) == 0
    record = json.loads((tmp_path / "train_settings.json").read_text())
    n = train.CALIBRATION_STEPS
    for part in train.PARTS:
        assert record["report"][part]["steps_done"] == n and record["report"][part][
            "budget_s"] == 0.0
    assert f"ti={n},controlnet={n} " in record["command"]
    assert (tmp_path / "ControlNet" / "control_tiny_canny.safetensors").is_file()


def test_a_part_replays_bit_for_bit():
    settings = train.Settings(steps={"vae": 2}, vae_batch=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train.train_vae(settings, train.Clock(settings), {}).state_dict() for _ in "ab"]
    finally:
        torch.set_num_threads(threads)  # later tests compare renders with other processes
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_time_budget_fixes_the_step_count_up_front(monkeypatch):
    """On a clock that only the steps move (0.25 s each), a 10 s budget is 40 steps, fixed
    after the calibration steps and never changed."""
    now = [1000.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(monotonic=lambda: now[0]))
    settings = train.Settings(minutes=10 / 60, reserve_s=0.0)  # all of it for "vae"
    settings.shares = {"vae": 1.0, "unet": 0.0, "lora": 0.0, "ti": 0.0, "controlnet": 0.0}
    clock, report, totals = train.Clock(settings), {}, []

    def step(i, total):
        totals.append(total)
        now[0] += 0.25
        return 1.0

    train.train_loop("vae", step, settings, clock, report, clock.start_part("vae"))
    assert totals[train.CALIBRATION_STEPS:] == [40] * (40 - train.CALIBRATION_STEPS)
    assert report["vae"]["steps"] == report["vae"]["steps_done"] == 40
    assert report["vae"]["budget_s"] == pytest.approx(10.0)


def test_a_default_hour_gives_the_controlnet_the_18_minutes_it_shipped_with(monkeypatch):
    """Each part, in turn, takes the share it was given of the time left: with the default
    shares the ControlNet, trained last, gets about 18 minutes of 60, the UNet 22."""
    now = [0.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(monotonic=lambda: now[0]))
    clock = train.Clock(train.Settings())
    for part in train.PARTS:
        clock.start_part(part)
        now[0] += clock.budgets[part]
    minutes = {part: clock.budgets[part] / 60 for part in train.PARTS}
    assert 17.5 < minutes["controlnet"] < 18.5 and 21.5 < minutes["unet"] < 22.5
    assert sum(minutes.values()) == pytest.approx(60 - 0.5)  # reserve_s: 30 s


def test_kohya_names():
    assert train.kohya_name("lora_unet", "down_blocks.1.attentions.0.transformer_blocks.0."
                            "attn2.to_out.0") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert train.kohya_name("lora_te", "encoder.layers.1.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj"


def test_a_part_cut_short_replays_its_schedule():
    settings = train.Settings(steps={"vae": 10}, stop={"vae": 4})
    clock, report, calls = train.Clock(settings), {}, []

    def step(i, total):
        calls.append((i, total))
        return 0.5

    train.train_loop("vae", step, settings, clock, report, clock.start_part("vae"))
    assert calls == [(i, 10) for i in range(4)]
    assert (report["vae"]["steps"], report["vae"]["steps_done"]) == (10, 4)
    assert parse_steps("vae=9,unet=7:5") == ({"vae": 9, "unet": 7}, {"unet": 5})


def test_outputs_load_through_sdbatch_own_loaders(trained):
    """The folder, the LoRA and the embedding as a job would use them: a stack with the
    embedding, the LoRA checked against it and applied at weights 0 and 1."""
    from sdbatch.models.stack import StackSpec, load
    from sdbatch.prompts.encode import encode

    out, _ = trained
    lora, embedding = out / "Lora" / "LegoAlrev.safetensors", out / "embeddings" / "nightsky.pt"
    stack = load(StackSpec("tiny", out / "tiny", embeddings=(embedding,)), torch.device("cpu"))
    assert "nightsky" in stack.triggers
    stack.check_loras([lora])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])

    def predict():
        with torch.no_grad():
            c = encode(stack.pipe.tokenizer, stack.pipe.text_encoder,
                       ["LegoAlrev, a red building, nightsky"], 1, torch.device("cpu"))
            return stack.pipe.unet(x, t, c).sample

    bare = predict()
    stack.use_networks([(lora, 1.0)], [])
    on = predict()
    stack.use_networks([(lora, 0.0)], [])
    assert not torch.equal(on, bare)
    assert torch.allclose(predict(), bare, atol=1e-6)


def test_a_few_upscaler_steps_write_a_2x_model_spandrel_reads(tmp_path):
    """The tiny upscaler's trainer end to end on 2 steps: a file in ESRGAN/ that spandrel
    identifies as a x2 super-resolution model, and the record that replays it."""
    from sdbatch.models import spandrel_files
    from sdbatch.tiny_train import upscaler

    settings = upscaler.UpscalerSettings(steps=2, batch=2, threads=1)
    record = upscaler.train(tmp_path, settings)
    model = spandrel_files.load(tmp_path / record["file"])
    assert record["file"] == "ESRGAN/2x-tiny-Compact.safetensors"
    assert model.scale == 2 and model.architecture.name == "RealESRGAN Compact"
    assert record["command"].endswith("--steps 2") and len(record["loss_curve"]) == 1
    low, high = upscaler.pairs(settings, 0)
    assert tuple(high.shape[2:]) == (2 * low.shape[2], 2 * low.shape[3])
