"""Post-steps on the tiny model: hires fix, img2img and inpaint as stages of a keyed graph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch import masks, matrix
from sdbatch import run as runner
from sdbatch.executors import worker as local
from sdbatch.output import png
from sdbatch.output.infotext import parse_infotext
from sdbatch.plan import make_plan
from sdbatch.schema import JobError, validate
from sdbatch.stages import img2img, inpaint, txt2img
from sdbatch.stages.common import Item

BASE = {"prompt": "a red building, two storeys, lawn, blue sky", "negative_prompt": "",
        "params": {"sampler": "Euler", "steps": 6, "cfg_scale": 5, "seed": 3,
                   "width": 64, "height": 64}}


def run_job(raw: dict, folder: Path) -> int:
    raw = {**raw, "run": {**raw.get("run", {}), "dir": str(folder), "progress": "quiet"}}
    return runner.run(validate(raw), lambda key: "test", [], ["test"])


def entries(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def image(folder: Path, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / entry["file"]).convert("RGB"), dtype=np.int16)


def centre_mask(path: Path, size: int = 64) -> Path:
    """Where tiny draws its building: the middle of the picture."""
    m = np.zeros((size, size), np.uint8)
    m[size // 8:size * 3 // 4, size // 4:size * 3 // 4] = 255
    Image.fromarray(m).save(path)
    return path


@pytest.fixture
def counting(monkeypatch):
    """Counts the calls each stage computes."""
    counts: dict[str, int] = {}
    for kind, real in list(local.STAGES.items()):
        def wrapped(stack, batch, on_step=None, real=real, kind=kind, **kw):
            counts[kind] = counts.get(kind, 0) + len(batch)
            return real(stack, batch, on_step, **kw)
        monkeypatch.setitem(local.STAGES, kind, wrapped)
    return counts


def test_one_base_under_three_hires_variants_is_drawn_once(tmp_path, counting):
    job = {**BASE, "post": [{"hires_fix": {"scale": 2, "steps": 3,
                                           "denoise": [0.3, 0.45, 0.6]}}]}
    assert run_job(job, tmp_path / "r") == 0
    assert counting == {"txt2img": 1, "hires_fix": 3}
    done = entries(tmp_path / "r")
    assert [e["status"] for e in done] == ["ok"] * 3
    pictures = [image(tmp_path / "r", e) for e in done]
    assert all(p.shape == (128, 128, 3) for p in pictures)
    assert not np.array_equal(pictures[0], pictures[2])
    stages = [[s["kind"] for s in e["recipe"]["stages"]] for e in done]
    assert stages == [["txt2img", "hires_fix"]] * 3
    assert len({e["recipe"]["stages"][0]["key"] for e in done}) == 1  # one shared base
    assert not (tmp_path / "r/intermediates").exists()  # removed when the run completes


def test_hires_variants_of_other_cfg_share_a_pass_each_with_its_own(tmp_path, monkeypatch):
    """Two hires CFG scales on one base: one hires pass of two, each image within a level
    of what its own CFG gives in a pass of its own."""
    passes = []
    real = local.STAGES["hires_fix"]
    monkeypatch.setitem(local.STAGES, "hires_fix", lambda stack, batch, *a, **kw: (
        passes.append(len(batch)), real(stack, batch, *a, **kw))[1])
    job = {**BASE, "post": [{"hires_fix": {"scale": 2, "steps": 3, "denoise": 0.6,
                                           "cfg_scale": [1, 9]}}]}
    run_job(job, tmp_path / "shared")
    assert passes == [2]
    run_job({**job, "executor": {"max_batch": 1}}, tmp_path / "alone")
    assert passes == [2, 1, 1]
    shared, alone = entries(tmp_path / "shared"), entries(tmp_path / "alone")
    for a, b in zip(shared, alone, strict=True):
        assert np.abs(image(tmp_path / "shared", a) - image(tmp_path / "alone", b)).max() <= 1
    assert np.abs(image(tmp_path / "shared", shared[0])
                  - image(tmp_path / "shared", shared[1])).max() > 3


def test_a_run_stopped_after_its_base_pass_resumes_without_drawing_it_again(
        tmp_path, monkeypatch, counting):
    job = {**BASE, "post": [{"hires_fix": {"scale": 2, "steps": 3, "denoise": [0.3, 0.6]}}]}
    real = local.STAGES["hires_fix"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setitem(local.STAGES, "hires_fix", interrupted)
    assert run_job(job, tmp_path / "r") == runner.EXIT_INTERRUPTED
    assert counting["txt2img"] == 1
    assert list((tmp_path / "r/intermediates").glob("*.png"))  # the base pass is on disk
    monkeypatch.setitem(local.STAGES, "hires_fix", real)
    counting.clear()
    assert run_job(job, tmp_path / "r") == 0
    assert "txt2img" not in counting and counting["hires_fix"] == 2
    resumed = entries(tmp_path / "r")
    counting.clear()
    assert run_job(job, tmp_path / "fresh") == 0
    fresh = entries(tmp_path / "fresh")
    assert [e["sha256"] for e in resumed] == [e["sha256"] for e in fresh]


def test_a_hires_prompt_carries_the_images_networks(tmp_path):
    """The WebUI's hires pass takes the networks its own prompt names: a pasted Hires prompt
    without them would lose the image's LoRA in the second pass."""
    job = {**BASE, "model": {"checkpoint": "tiny", "loras": [{"name": "LegoAlrev",
                                                             "weight": 0.5}]},
           "post": [{"hires_fix": {"scale": 1.5, "steps": 2, "denoise": 0.3,
                                   "prompt": "a red building, lawn"}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    _, _, params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])["parameters"])
    assert params["Hires prompt"] == "a red building, lawn<lora:LegoAlrev:0.5>"


def test_hires_infotext_and_denoise_zero(tmp_path):
    job = {**BASE, "post": [{"hires_fix": {"scale": 1.5, "steps": 3, "denoise": 0.5,
                                           "upscaler": "Lanczos", "sampler": "DDIM"}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    _, _, params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])["parameters"])
    assert params["Size"] == "64x64"  # the first pass's, as the WebUI writes it
    assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"],
            params["Denoising strength"], params["Hires sampler"]) == \
        ("1.5", "3", "Lanczos", "0.5", "DDIM")
    keys = list(params)
    assert keys.index("Denoising strength") < keys.index("RNG") < keys.index("Hires upscale")


def test_pure_geometry_of_a_plan_refuses_sizes_off_the_latent_grid(tmp_path):
    job = {**BASE, "post": [{"hires_fix": {"scale": 1.3}}], "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError, match=r"post\[0\].hires_fix.*83x83.*multiples of 8"):
        runner.prepare(validate(job), lambda key: "test")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def base_picture(tiny_stack):
    r = matrix.expand(matrix.resolve_seeds(validate(BASE), 0))[0]
    return r, txt2img.run(tiny_stack, (r,))[0]


def items_for(kind: str, raw_step: dict, base, tmp_path: Path) -> list[Item]:
    job = validate({**BASE, "post": [{kind: raw_step}]})
    renders = matrix.expand(matrix.resolve_seeds(job, 0))
    from sdbatch.plan import InputImage
    inputs = {}
    if kind == "inpaint":
        m = masks.read_mask(Path(raw_step["mask"]))
        inputs[raw_step["mask"]] = InputImage("x", (m.shape[1], m.shape[0]))
    plan = make_plan(renders, {"tiny": "t"}, 1, {}, inputs)
    render, picture = base
    return [Item(renders[i], plan.chains[i][1].params, picture) for i in range(len(renders))]


def test_denoise_zero_returns_the_input(tiny_stack, base_picture, tmp_path):
    [item] = items_for("img2img", {"denoise": 0}, base_picture, tmp_path)
    [out] = img2img.run(tiny_stack, [item])
    assert np.array_equal(np.asarray(out.image), np.asarray(base_picture[1].image))
    mask = str(centre_mask(tmp_path / "m.png"))
    [item] = items_for("inpaint", {"mask": mask, "denoise": 0}, base_picture, tmp_path)
    [out] = inpaint.run(tiny_stack, [item])
    assert np.array_equal(np.asarray(out.image), np.asarray(base_picture[1].image))


@pytest.mark.parametrize("area", ["whole_picture", "only_masked"])
def test_inpaint_keeps_every_pixel_outside_the_blurred_mask(tiny_stack, base_picture,
                                                            tmp_path, area):
    mask_path = centre_mask(tmp_path / "m.png")
    step = {"mask": str(mask_path), "denoise": 0.9, "mask_blur": 2, "inpaint_area": area,
            "only_masked_padding": 4, "prompt": "a blue building, night"}
    [item] = items_for("inpaint", step, base_picture, tmp_path)
    [out] = inpaint.run(tiny_stack, [item])
    before = np.asarray(base_picture[1].image)
    after = np.asarray(out.image)
    outside = masks.blur(masks.read_mask(mask_path), 2) == 0
    assert np.array_equal(after[outside], before[outside])
    inside = masks.read_mask(mask_path) == 255
    assert np.abs(after[inside].astype(int) - before[inside]).mean() > 20  # it repainted


def test_a_mask_of_another_resolution_is_blurred_at_its_own_then_resized(base_picture,
                                                                       tmp_path):
    """The WebUI blurs the mask as it was drawn, then resizes it to the picture: a 32 px mask
    on a 64 px picture with blur 2 has an edge as soft as blur 4 at 64 px."""
    small = np.zeros((32, 32), np.uint8)
    small[8:24, 8:24] = 255
    Image.fromarray(small).save(tmp_path / "small.png")
    [item] = items_for("inpaint", {"mask": str(tmp_path / "small.png"), "mask_blur": 2},
                       base_picture, tmp_path)
    want = Image.fromarray(masks.blur(small, 2)).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(inpaint.region(item).mask, np.asarray(want))


def test_each_masked_content_mode_starts_the_hole_differently(tiny_stack, base_picture,
                                                               tmp_path):
    mask = str(centre_mask(tmp_path / "m.png"))
    outs = {}
    for content in ("original", "fill", "latent_noise", "latent_nothing"):
        [item] = items_for("inpaint", {"mask": mask, "denoise": 0.4, "mask_blur": 0,
                                       "masked_content": content,
                                       "prompt": "a blue building, night"},
                           base_picture, tmp_path)
        outs[content] = np.asarray(inpaint.run(tiny_stack, [item])[0].image, dtype=int)
    inside = masks.read_mask(Path(mask)) == 255
    holes = {k: v[inside] for k, v in outs.items()}
    for a in holes:
        for b in holes:
            if a < b:
                assert np.abs(holes[a] - holes[b]).mean() > 1, (a, b)
    before = np.asarray(base_picture[1].image, dtype=int)[inside]
    # half denoise from the picture itself stays nearest the picture
    assert np.abs(holes["original"] - before).mean() < np.abs(holes["latent_nothing"]
                                                              - before).mean()


def test_inpaint_from_an_init_image_in_a_job(tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), (40, 160, 60), np.uint8)).save(init)
    mask = centre_mask(tmp_path / "mask.png", 32)  # half size: resized to fit
    job = {**BASE, "init_image": str(init),
           "post": [{"inpaint": {"mask": str(mask), "denoise": 0.8, "mask_blur": 1,
                                 "prompt": "flowers", "steps": 5, "seed": 42,
                                 "sampler": "DDIM"}}]}
    assert run_job(job, tmp_path / "r") == 0
    [entry] = entries(tmp_path / "r")
    out = image(tmp_path / "r", entry)
    assert (out[:, 56:] == (40, 160, 60)).all()  # far from the mask: the init image's bytes
    assert [s["kind"] for s in entry["recipe"]["stages"]] == ["image", "inpaint"]
    prompt, _, params = parse_infotext(png.read_text(tmp_path / "r" / entry["file"])[
        "parameters"])
    assert params["Mask blur"] == "1" and params["Denoising strength"] == "0.8"
    # what the WebUI's img2img tab writes: the pass's own prompt, steps, sampler and seed
    assert (prompt, params["Steps"], params["Sampler"], params["Seed"]) == \
        ("flowers", "5", "DDIM", "42")


def test_bad_images_are_refused_up_front_with_their_key(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(wide)
    (tmp_path / "broken.png").write_bytes(b"nope")
    job = {**BASE, "init_image": str(tmp_path / "missing.png"),
           "post": [{"img2img": {}}], "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError, match=r"init_image.*no picture at"):
        runner.prepare(validate(job), lambda key: "test")
    escaped = {**job, "init_image": "C:\temp\new.png"}  # a tab and a newline, as YAML reads it
    with pytest.raises(JobError, match=r"no picture at 'C:\\temp\\new.png'.*control "
                       r"character.*single quotes or with /"):
        runner.prepare(validate(escaped), lambda key: "test")
    job = {**BASE, "post": [{"inpaint": {"mask": str(tmp_path / "broken.png")}}],
           "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError, match=r"post\[0\].inpaint.mask.*not a readable image"):
        runner.prepare(validate(job), lambda key: "test")
    job = {**BASE, "post": [{"inpaint": {"mask": str(wide)}}], "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError, match=r"aspect ratio"):
        runner.prepare(validate(job), lambda key: "test")
    with pytest.raises(JobError, match=r"init image needs a post-step"):
        validate({**BASE, "init_image": "x.png"})
    assert not (tmp_path / "r").exists()


def test_a_changed_input_image_refuses_the_resume(tmp_path):
    mask = centre_mask(tmp_path / "m.png")
    job = {**BASE, "post": [{"inpaint": {"mask": str(mask), "denoise": 0.3}}]}
    assert run_job(job, tmp_path / "r") == 0
    Image.fromarray(255 - masks.read_mask(mask)).save(mask)
    with pytest.raises(JobError, match=r"input .*m.png"):
        run_job(job, tmp_path / "r")


def test_post_step_keys_are_axes_and_zip(tmp_path):
    job = validate({**BASE, "params": {**BASE["params"], "seed": [1, 2]},
                    "post": [{"hires_fix": {"denoise": [0.3, 0.5]}}],
                    "zip": [["post.0.hires_fix.denoise", "seed"]]})
    renders = matrix.expand(matrix.resolve_seeds(job, 0))
    assert [(r.seed, r.post[0]["denoise"]) for r in renders] == [(1, 0.3), (2, 0.5)]
    crossed = validate({**BASE, "post": [{"img2img": {"denoise": [0.3, 0.5],
                                                     "cfg_scale": [4, 6]}}]})
    assert matrix.count(crossed) == 4
    with pytest.raises(JobError, match="one of hires_fix, img2img, inpaint"):
        validate({**BASE, "post": [{"img2img": {}, "hires_fix": {}}]})
    with pytest.raises(JobError, match=r"post\[0\].hiresfix.*did you mean 'hires_fix'"):
        validate({**BASE, "post": [{"hiresfix": {}}]})


def nine_channel_copy(folder: Path, extra_weight: float) -> Path:
    """The tiny model as a 9-channel inpainting model: its own UNet with conv_in widened for
    the mask and masked-picture channels (weighted by ``extra_weight``)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sdbatch.models.tiny import model_folder

    pipe = StableDiffusionPipeline.from_pretrained(model_folder(), dtype=torch.float32,
                                                   local_files_only=True)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    state = pipe.unet.state_dict()
    w = state["conv_in.weight"]
    extra = torch.randn((w.shape[0], 5, *w.shape[2:]),
                        generator=torch.Generator().manual_seed(0)) * extra_weight
    state["conv_in.weight"] = torch.cat([w, extra], dim=1)
    unet.load_state_dict(state)
    pipe.unet = unet
    pipe.save_pretrained(folder)
    return folder


def test_a_nine_channel_inpainting_model_takes_the_mask_as_input(tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), (90, 150, 220), np.uint8)).save(init)
    mask = centre_mask(tmp_path / "mask.png")
    outs = {}
    for weight in (0.0, 0.5):
        model = nine_channel_copy(tmp_path / f"inpaint-{weight}", weight)
        job = {**BASE, "model": {"checkpoint": str(model)}, "init_image": str(init),
               "post": [{"inpaint": {"mask": str(mask), "denoise": 1.0, "mask_blur": 2}}]}
        assert run_job(job, tmp_path / f"r{weight}") == 0
        [entry] = entries(tmp_path / f"r{weight}")
        outs[weight] = image(tmp_path / f"r{weight}", entry)
    outside = masks.blur(masks.read_mask(mask), 2) == 0
    for out in outs.values():
        assert (out[outside] == (90, 150, 220)).all()
    inside = masks.read_mask(mask) == 255
    # the extra channels reach the UNet: weighting them changes the repaint
    assert np.abs(outs[0.0][inside] - outs[0.5][inside]).mean() > 1


def test_a_nine_channel_model_sees_a_grey_hole_and_keeps_the_webuis_blends(tmp_path,
                                                                          monkeypatch):
    """As the WebUI: the masked picture's hole is 0 in the VAE's -1..1 (mid-grey, not black),
    made from the filled picture, and every model call and the result blend the known
    latents back in, for 9-channel models too."""
    import torch

    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), (90, 150, 220), np.uint8)).save(init)
    mask = centre_mask(tmp_path / "mask.png")
    model = nine_channel_copy(tmp_path / "inpaint", 0.5)
    encoded, masked_kw = [], []
    real_encode, real_tail = inpaint.encode, inpaint.sample_tail

    def encode(pipe, pictures, device):
        encoded.append(pictures if isinstance(pictures, torch.Tensor)
                       else inpaint.pixels(pictures))
        return real_encode(pipe, pictures, device)

    def tail(*args, **kw):
        masked_kw.append(kw["mask"])
        return real_tail(*args, **kw)

    monkeypatch.setattr(inpaint, "encode", encode)
    monkeypatch.setattr(inpaint, "sample_tail", tail)
    job = {**BASE, "model": {"checkpoint": str(model)}, "init_image": str(init),
           "post": [{"inpaint": {"mask": str(mask), "denoise": 0.8, "mask_blur": 0,
                                 "masked_content": "fill"}}]}
    assert run_job(job, tmp_path / "r") == 0
    start, masked = encoded
    hole = torch.from_numpy(masks.read_mask(mask) >= 128)
    assert (masked[:, :, hole] == 0).all()  # grey
    assert torch.equal(masked[:, :, ~hole], start[:, :, ~hole])  # the filled picture
    assert masked_kw[0] is not None and masked_kw[0].max() == 1


def test_an_inpainting_model_draws_txt2img_and_img2img_as_the_webui(tmp_path, monkeypatch):
    """Outside inpaint a 9-channel model takes the WebUI's "everything to paint"
    conditioning: the mask all 1, the masked picture mid-grey (it failed every batch)."""
    import torch

    from sdbatch import sampling

    model = nine_channel_copy(tmp_path / "inpaint", 0.5)
    seen = []
    real = sampling.sample

    def spy(*args, **kw):
        seen.append(kw.get("image_conditioning"))
        return real(*args, **kw)

    monkeypatch.setattr(sampling, "sample", spy)
    job = {**BASE, "model": {"checkpoint": str(model)}, "post": [{"img2img": {"denoise": 0.5}}]}
    assert run_job(job, tmp_path / "r") == 0
    assert len(seen) == 2 and all(c is not None and c.shape[1] == 5 for c in seen)
    assert all(torch.equal(c[:, :1], torch.ones_like(c[:, :1])) for c in seen)
    assert torch.equal(seen[0][:, 1:], seen[1][:, 1:])  # the same grey picture


def test_only_masked_with_a_blank_mask_is_img2img_of_the_whole_picture(tiny_stack,
                                                                       base_picture, tmp_path):
    """The WebUI: "mask is blank, switch to img2img mode"; a pass of several masks must not
    lose the others to one blank one."""
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank)
    [item] = items_for("inpaint", {"mask": str(blank), "denoise": 0.6,
                                   "inpaint_area": "only_masked"}, base_picture, tmp_path)
    [out] = inpaint.run(tiny_stack, [item])
    before = np.asarray(base_picture[1].image, dtype=int)
    after = np.asarray(out.image, dtype=int)
    assert out.image.size == base_picture[1].image.size
    assert (np.abs(after - before).max(axis=2) > 0).mean() > 0.9  # repainted everywhere


def test_only_masked_keeps_the_pictures_size_for_the_next_step():
    from sdbatch.plan import output_size

    step = {"width": 32, "height": 32, "inpaint_area": "only_masked"}
    assert output_size("inpaint", step, (128, 96)) == (128, 96)  # pasted back into it
    assert output_size("inpaint", {**step, "inpaint_area": "whole_picture"},
                       (128, 96)) == (32, 32)


def test_the_inpaint_blends_noise_level_is_each_images_own():
    """k-diffusion inputs are latents / sqrt(1 + s^2): the ratio read back per image, so an
    image's bits do not depend on the others in its pass."""
    import torch

    from sdbatch import samplers, sampling
    from sdbatch.models import tiny

    config = json.loads((tiny.model_folder() / "scheduler/scheduler_config.json").read_text())
    scheduler = samplers.make_scheduler(config, "Euler", "Automatic")
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen) * torch.tensor([1.0, 30.0]).view(2, 1, 1, 1)
    x_t = scheduler.scale_model_input(latents, scheduler.timesteps[0])
    both, _ = sampling.noise_level(scheduler, latents, x_t, scheduler.timesteps[0])
    alone, _ = sampling.noise_level(scheduler, latents[:1], x_t[:1], scheduler.timesteps[0])
    assert torch.equal(both[:1], alone)


def test_an_init_image_folder_is_an_axis(tmp_path):
    folder = tmp_path / "inits"
    folder.mkdir()
    from sdbatch.tiny_train.scenes import Scene, draw

    for i, sky in enumerate(["blue", "night"]):  # pictures like those tiny learned from
        Image.fromarray(draw(Scene(sky=sky)).image).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not a picture")
    job = {**BASE, "init_image": str(folder), "post": [{"img2img": {"denoise": 0.2}}]}
    assert run_job(job, tmp_path / "r") == 0
    done = entries(tmp_path / "r")
    assert len(done) == 2
    skies = [image(tmp_path / "r", e)[:8].mean() for e in done]
    assert skies[0] > skies[1] + 50  # each image starts from its own picture


def test_a_second_pass_on_another_checkpoint(tmp_path, tiny_stack, counting):
    from sdbatch.models.ldm_export import save_single_file

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    save_single_file(tiny_stack.pipe, models / "Stable-diffusion" / "other.safetensors")
    from sdbatch.models.tiny import model_folder

    job = {**BASE, "paths": {"models": str(models)},
           "model": {"config": str(model_folder())},
           "post": [{"hires_fix": {"steps": 3, "denoise": 0.4,
                                   "checkpoint": ["tiny", "other"]}}]}
    assert run_job(job, tmp_path / "r") == 0
    assert counting == {"txt2img": 1, "hires_fix": 2}
    done = entries(tmp_path / "r")
    _, _, params = parse_infotext(png.read_text(tmp_path / "r" / done[1]["file"])["parameters"])
    assert re.fullmatch(r"other \[[0-9a-f]{10}\]", params["Hires checkpoint"])  # its title
    assert "Hires checkpoint" not in parse_infotext(
        png.read_text(tmp_path / "r" / done[0]["file"])["parameters"])[2]


def test_reproduce_renders_the_whole_chain_and_notices_a_changed_mask(tmp_path):
    from sdbatch.reproduce import reproduce

    mask = centre_mask(tmp_path / "m.png")
    job = {**BASE, "params": {**BASE["params"], "seed": [3, 4]},
           "post": [{"hires_fix": {"steps": 3, "denoise": 0.4}},
                    {"inpaint": {"mask": str(mask), "denoise": 0.5, "steps": 4}}]}
    assert run_job(job, tmp_path / "r") == 0
    picture = tmp_path / "r" / entries(tmp_path / "r")[1]["file"]
    assert reproduce(picture)
    Image.fromarray(255 - masks.read_mask(mask)).save(mask)
    assert not reproduce(picture)


@pytest.mark.parametrize("sampler", ["Euler a", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M",
                                     "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "PLMS", "UniPC"])
def test_inpaint_repaints_with_every_sampler(tiny_stack, base_picture, tmp_path, sampler):
    """Second-order samplers start part way at a step's first call (a regression: starting
    one call early left DPM2 a and DPM++ SDE with no picture at all)."""
    mask = centre_mask(tmp_path / "m.png")
    [item] = items_for("inpaint", {"mask": str(mask), "denoise": 0.75, "mask_blur": 2,
                                   "sampler": sampler, "steps": 8,
                                   "prompt": "a blue building, night"}, base_picture, tmp_path)
    out = np.asarray(inpaint.run(tiny_stack, [item])[0].image, dtype=int)
    before = np.asarray(base_picture[1].image, dtype=int)
    inside = masks.read_mask(mask) == 255
    assert (out[inside][:, 2] - out[inside][:, 0]).mean() > 30  # the building turned blue
    outside = masks.blur(masks.read_mask(mask), 2) == 0
    assert np.array_equal(out[outside], before[outside])
    near = ~inside & ~outside  # the seam: the unmasked latent was held to the picture
    assert np.abs(out[near] - before[near]).mean() < 25


def test_a_picture_whose_name_holds_brackets_is_a_file_not_a_pattern(tmp_path):
    from sdbatch import inputs

    picture = tmp_path / "hq [v2].png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    assert inputs.find("hq [v2].png", [tmp_path]) == [picture]
    assert inputs.find("hq*.png", [tmp_path]) == [picture]  # a pattern still is one


def test_a_found_picture_is_recorded_with_forward_slashes(monkeypatch):
    """Windows' relpath gives jobs\\assets\\x.png: recorded so, a recipe made there named no
    file elsewhere, and a resume on another system read it as a changed job."""
    from types import SimpleNamespace

    from sdbatch import inputs

    windows = SimpleNamespace(sep="\\", path=SimpleNamespace(
        relpath=lambda p: "jobs\\assets\\x.png" if "x.png" in str(p) else "..\\up.png"))
    monkeypatch.setattr(inputs, "os", windows)
    assert inputs.shown(Path("C:/work/jobs/assets/x.png")) == "jobs/assets/x.png"
    assert inputs.shown(Path("up.png")) == "up.png"
