"""Every sampler renders, and renders the same twice; variation seeds and eta reach the image."""

import numpy as np
import pytest
import torch

from sdbatch import noise, samplers
from sdbatch.matrix import Render
from sdbatch.stages import txt2img


def txt2img_images(stack, renders, on_step=None):
    """The pictures of a txt2img batch (the stage hands on pictures with their latents)."""
    return [p.image for p in txt2img.run(stack, renders, on_step)]


def render(**kw) -> Render:
    base = dict(index=0, cell=0, checkpoint="tiny", prompt="a red house", negative_prompt="",
                sampler="Euler", schedule_type="Automatic", steps=3, cfg_scale=5.0, seed=7,
                width=64, height=64, clip_skip=1)
    return Render(**{**base, **kw})


def pixels(stack, *renders) -> list[np.ndarray]:
    return [np.asarray(im, dtype=int) for im in txt2img_images(stack, tuple(renders))]


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_is_reproducible_run_to_run(tiny_stack, name):
    sampler, schedule = samplers.split(name)
    r = render(sampler=sampler, schedule_type=schedule, steps=4 if name == "LCM" else 3)
    [a] = pixels(tiny_stack, r)
    [b] = pixels(tiny_stack, r)
    assert np.array_equal(a, b)


def test_stochastic_samplers_draw_from_the_image_seed(tiny_stack, monkeypatch):
    """Same starting latents, another seed: only a sampler that draws later noise changes."""
    fixed = noise.randn(0, (4, 8, 8))
    monkeypatch.setattr(noise, "initial_noise", lambda *args: fixed)
    for name in ["Euler", "DPM++ 2M", "Heun", *(n for n, s in samplers.SAMPLERS.items()
                                                if s.stochastic)]:
        sampler, schedule = samplers.split(name)
        a, b = pixels(tiny_stack, render(sampler=sampler, schedule_type=schedule, seed=1),
                      render(sampler=sampler, schedule_type=schedule, seed=2))
        assert np.array_equal(a, b) != samplers.is_stochastic(sampler), name


def test_variation_seed_moves_the_image_toward_the_subseed(tiny_stack):
    base, full, other, half = pixels(
        tiny_stack, render(seed=1), render(seed=1, subseed=2, subseed_strength=1.0),
        render(seed=2), render(seed=1, subseed=2, subseed_strength=0.5))
    assert np.abs(full - other).max() <= 1
    assert not np.array_equal(half, base) and not np.array_equal(half, other)


def test_eta_changes_ddim(tiny_stack):
    [a] = pixels(tiny_stack, render(sampler="DDIM", schedule_type="Automatic"))
    [b] = pixels(tiny_stack, render(sampler="DDIM", schedule_type="Automatic", eta=1.0))
    assert not np.array_equal(a, b)


def test_ensd_changes_ancestral_noise_only(tiny_stack):
    a, b = pixels(tiny_stack, render(sampler="Euler a"), render(sampler="Euler a", ensd=31337))
    c, d = pixels(tiny_stack, render(sampler="Euler"), render(sampler="Euler", ensd=31337))
    assert not np.array_equal(a, b) and np.array_equal(c, d)


def test_a_long_prompt_beside_a_short_one_changes_nothing(tiny_stack):
    """Each image is conditioned alone: a neighbour's extra chunks are not padded onto it."""
    long = "a red house, " + ", ".join(f"window {i}" for i in range(60))
    [alone] = pixels(tiny_stack, render(prompt="a red house"))
    short, _ = pixels(tiny_stack, render(prompt="a red house"), render(prompt=long, seed=8))
    assert np.abs(alone - short).max() <= 1


def test_prompt_editing_switches_the_prompt_during_sampling(tiny_stack):
    r = dict(steps=6, sampler="Euler")
    blue, switched, never, red_blue, blue_red = pixels(
        tiny_stack, render(prompt="a blue tower", **r),
        render(prompt="[a blue tower:a red house:0]", **r),
        render(prompt="[a blue tower:a red house:100]", **r),
        render(prompt="[a red house|a blue tower]", **r),
        render(prompt="[a blue tower|a red house]", **r))
    assert np.abs(never - blue).max() <= 1  # the switch never comes
    assert np.abs(switched - blue).max() > 3  # red from step 1 on
    assert np.abs(red_blue - blue_red).max() > 3  # alternation: the order matters


def test_prompt_editing_on_sdxl(tmp_path):
    from sdbatch.models.stack import Stack, StackSpec

    from .conftest import build_tiny_sdxl

    pipe = build_tiny_sdxl(tmp_path)
    stack = Stack(StackSpec("xl", tmp_path), pipe, dict(pipe.scheduler.config),
                  torch.device("cpu"), torch.float32)
    r = dict(steps=4, sampler="Euler")
    [plain] = pixels(stack, render(prompt="a red house", **r))
    [edited] = pixels(stack, render(prompt="[a red house:a long blue tower by night:2]", **r))
    assert plain.shape == edited.shape and not np.array_equal(plain, edited)


def conditioned_calls(stack, monkeypatch, prompt: str, **kw) -> tuple[str, list]:
    """Which of "a red house" (a) and "a blue tower" (b) each model call was conditioned
    on, and the progress reports."""
    pipe, seen, steps = stack.pipe, [], []
    real = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kwargs):
        seen.append(encoder_hidden_states[1:].clone())  # row 0 is the negative prompt
        return real(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    txt2img_images(stack, (render(prompt=prompt, **kw),), lambda done, total: steps.append(done))
    a, b = (txt2img.encode_text(pipe, t, 1, stack.device, stack.dtype)[0]
            for t in ("a red house", "a blue tower"))
    return "".join("a" if torch.equal(s, a) else "b" if torch.equal(s, b) else "?"
                   for s in seen), steps


@pytest.mark.parametrize("sampler", ["Heun", "DPM2"])
def test_second_order_samplers_switch_prompts_as_the_webui_counts(tiny_stack, monkeypatch,
                                                                  sampler):
    """The WebUI builds the schedule over steps x 2 model calls and counts calls: 4 steps are
    7 calls (the last step is one Euler call), [a:b:0.5] switches after call 4 (half way),
    [a|b] alternates per call; the progress bar counts the 4 steps."""
    edit, steps = conditioned_calls(tiny_stack, monkeypatch, "[a red house:a blue tower:0.5]",
                                    sampler=sampler, steps=4)
    assert edit == "aaaaabb"
    assert steps == [1, 2, 3, 4]
    alternate, _ = conditioned_calls(tiny_stack, monkeypatch, "[a red house|a blue tower]",
                                     sampler=sampler, steps=4)
    assert alternate == "aababab"


def test_first_order_samplers_switch_per_step(tiny_stack, monkeypatch):
    edit, steps = conditioned_calls(tiny_stack, monkeypatch, "[a red house:a blue tower:0.5]",
                                    sampler="Euler", steps=4)
    assert edit == "aaab" and steps == [1, 2, 3, 4]


def test_and_of_one_prompt_split_in_halves_is_the_prompt(tiny_stack):
    plain, halves, one = pixels(tiny_stack, render(), render(
        prompt="a red house :0.5 AND a red house :0.5"), render(prompt="a red house :1"))
    assert np.abs(plain - one).max() <= 1  # ":1" is the default weight; rows may batch apart
    assert np.abs(plain - halves).max() <= 1  # uncond + 2 * 0.5 * cfg * (cond - uncond)


def test_and_weights_matter_and_parts_are_not_words(tiny_stack):
    plain, weak, composed, words = pixels(
        tiny_stack, render(), render(prompt="a red house :0.3"),
        render(prompt="a red house AND a blue tower"), render(prompt="a red house a blue tower"))
    assert np.abs(plain - weak).max() > 3
    assert np.abs(composed - words).max() > 3


def test_and_parts_get_their_own_rows(tiny_stack, monkeypatch):
    pipe, batches = tiny_stack.pipe, []
    real = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kwargs):
        batches.append(encoder_hidden_states.shape[0])
        return real(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    txt2img_images(tiny_stack, (render(prompt="a AND b AND c", negative_prompt="x AND y"),))
    assert set(batches) == {4}  # one negative (AND is a word there, as in the WebUI) + 3 parts


def test_sampling_can_start_part_way_from_init_latents(tiny_stack):
    """The img2img hook: start_step skips steps (Heun: 2 calls a step, the last one 1) and
    noises init_latents to where sampling starts; progress counts on from there."""
    from sdbatch import sampling

    scheduler = samplers.make_scheduler(tiny_stack.scheduler_config, "Heun", "Automatic")
    timeline = txt2img.Timeline(tiny_stack.pipe, render(), 2, tiny_stack.device,
                                tiny_stack.dtype)
    calls, steps = [], []

    def conditioning(call):
        calls.append(call)
        return txt2img.batch_conditioning([timeline], call, None)

    init = torch.zeros(1, 4, 8, 8)
    sampling.sample(tiny_stack.pipe.unet, scheduler, noise.randn(1, (1, 4, 8, 8)), 4,
                    conditioning, 5.0, start_step=2, init_latents=init,
                    on_step=lambda done, total: steps.append(done))
    # 4 Heun steps are calls 0-1, 2-3, 4-5 and 6: starting at step 2 is starting at call 4
    assert calls == [4, 5, 6] and steps == [3, 4]



def test_a_hires_pass_goes_on_with_its_first_passes_prompt_schedule(tiny_stack):
    """The WebUI (1.6 on): the hires pass's schedule continues the first pass's: a fraction
    counts from 1.0 and an integer from the first pass's steps."""
    def keys(prompt, first_pass):
        timeline = txt2img.Timeline(tiny_stack.pipe, render(prompt=prompt, steps=4), 1,
                                    tiny_stack.device, tiny_stack.dtype, first_pass)
        return [k[0][0] for k in timeline.keys]

    # the WebUI's counting: the entry ending at call 2 holds through call 2
    assert keys("[red:blue:0.5] house", None) == ["red house"] * 3 + ["blue house"]
    assert keys("[red:blue:0.5] house", 10) == ["blue house"] * 4  # switched in pass one
    assert keys("[red:blue:1.5] house", 10) == ["red house"] * 3 + ["blue house"]
    assert keys("[red:blue:12] house", 10) == ["red house"] * 3 + ["blue house"]


def test_guide_gives_each_image_its_own_cfg_scale():
    """Rows as _unet orders them: the negatives of the images that need one, then every
    image's parts. Image 1 (CFG 1, one plain part) has no negative and is its part alone."""
    from sdbatch import sampling

    # context rows: negatives 0-2, image 0's parts 3 and 4, image 1's 5, image 2's 6
    cond = sampling.Conditioning(torch.zeros(7, 1),
                                 (((3, 1.0), (4, 0.5)), ((5, 1.0),), ((6, 1.0),)))
    scales = [7.0, 1.0, 3.0]
    negatives = sampling.needs_negative(cond, scales)
    assert negatives == (True, False, True)
    u0, u2, a0, b0, p1, p2 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sampling.guide(torch.stack([u0, u2, a0, b0, p1, p2]), cond, scales, negatives)
    expected = torch.stack([u0 + (a0 - u0) * 7 + (b0 - u0) * 3.5, p1, u2 + (p2 - u2) * 3])
    torch.testing.assert_close(out, expected)
    # CFG 1 with AND parts still needs its negative (uncond + sum of weighted parts)
    assert sampling.needs_negative(cond, [1.0, 1.0, 1.0]) == (True, False, False)


def test_each_image_of_a_pass_gets_what_its_own_cfg_gives_alone(tiny_stack, monkeypatch):
    """Seeds, prompts and CFG scales (1 among them) differ inside one pass; each image is
    the one its own CFG gives it rendered alone, within the rounding of another batch."""
    rs = [render(seed=7, cfg_scale=1.0), render(seed=8, prompt="a blue tower", cfg_scale=5.0),
          render(seed=7, cfg_scale=9.0, negative_prompt="blurry")]
    pipe, rows = tiny_stack.pipe, []
    real = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kwargs):
        rows.append(encoder_hidden_states.shape[0])
        return real(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    together = pixels(tiny_stack, *rs)
    assert set(rows) == {5}  # 2 negatives (the CFG 1 image needs none) + 3 prompts
    alone = [pixels(tiny_stack, r)[0] for r in rs]
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert np.abs(a - b).max() <= 1, i
    assert np.abs(together[0] - together[2]).max() > 3  # the CFG scale mattered


def test_guidance_embedding_is_each_images_own():
    """Guidance-distilled (LCM) UNets: each image's CFG scale becomes its own embedding."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=32)),
                           get_guidance_scale_embedding=lambda w, embedding_dim:
                           StableDiffusionPipeline.get_guidance_scale_embedding(
                               None, w, embedding_dim))
    both = txt2img._guidance_embedding(pipe, [3.0, 8.0], torch.float32, torch.device("cpu"))
    for row, cfg in zip(both, [3.0, 8.0], strict=True):
        assert torch.equal(row, txt2img._guidance_embedding(pipe, [cfg], torch.float32,
                                                            torch.device("cpu"))[0])
    assert not torch.equal(both[0], both[1])


def test_a_half_precision_vae_that_overflows_decodes_again_in_float32(tiny_stack):
    """The WebUI's automatic VAE precision: NaN from an fp16 VAE (some SD1 VAEs at large
    sizes) means the same decode again in float32, not a black picture."""
    import copy
    from types import SimpleNamespace

    pipe = tiny_stack.pipe
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = txt2img.decode(SimpleNamespace(vae=pipe.vae, image_processor=pipe.image_processor),
                          latents)
    vae = copy.deepcopy(pipe.vae).half()
    real = vae.decode

    def overflowing(z, **kw):
        out = real(z, **kw)
        return (torch.full_like(out[0], float("nan")),) if z.dtype == torch.float16 else out

    vae.decode = overflowing
    got = txt2img.decode(SimpleNamespace(vae=vae, image_processor=pipe.image_processor), latents)
    assert vae.dtype == torch.float16  # put back
    assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]))


class _CastCutShort(torch.nn.Module):
    """A half VAE whose first cast to float32 runs out of memory half-way (one layer cast),
    as Module.to does on a full GPU."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.a, self.b = torch.nn.Linear(2, 2).half(), torch.nn.Linear(2, 2).half()
        self.config = SimpleNamespace(force_upcast=True)
        self.cut = True

    @property
    def dtype(self):
        return self.a.weight.dtype

    def to(self, dtype):
        if dtype == torch.float32 and self.cut:
            self.cut = False
            self.a.to(dtype)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().to(dtype)


def test_a_vae_cast_cut_short_by_out_of_memory_is_put_back():
    """Else the VAE stays half float32, half float16, and every later pass on the stack fails
    with a dtype mismatch, which no out-of-memory retry mends."""
    from types import SimpleNamespace

    from sdbatch.stages import vae as vae_module

    sdxl = SimpleNamespace(vae=_CastCutShort(), text_encoder_2=object())
    with pytest.raises(torch.OutOfMemoryError), vae_module.upcast(sdxl):
        pass
    assert {p.dtype for p in sdxl.vae.parameters()} == {torch.float16}
    vae = _CastCutShort()
    with pytest.raises(torch.OutOfMemoryError):
        vae_module.half_safe(vae, lambda: torch.tensor([float("nan")]))
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def model_timesteps(stack, monkeypatch) -> list[int]:
    """The timesteps the stack's UNet is called at from now on: a list that fills."""
    seen: list[int] = []
    real = type(stack.pipe.unet).forward
    monkeypatch.setattr(type(stack.pipe.unet), "forward",
                        lambda self, sample, timestep, *a, **k: (
                            seen.append(int(timestep)), real(self, sample, timestep, *a, **k))[1])
    return seen


def test_ddim_takes_the_webuis_timestep_grid():
    """sd_samplers_timesteps: clip(range(0, 1000, 1000 // steps) + 1, 0, 999), a call at
    each point but the first; an img2img noises to grid[t_enc] and calls from below it."""
    from sdbatch.sampling import webui_timesteps

    calls, noised = webui_timesteps(20, None)
    assert calls == list(range(951, 50, -50)) and len(calls) == 19 and noised is None
    calls, _ = webui_timesteps(30, None)
    assert calls[0] == 991 and calls[-1] == 34 and len(calls) == 30
    calls, noised = webui_timesteps(20, 15)  # denoise 0.75: t_enc = 15
    assert noised == 751 and calls == list(range(701, 50, -50))
    assert webui_timesteps(20, 1) == ([], 51) and webui_timesteps(20, 0) == ([], 1)


def test_ddim_calls_the_model_at_the_webuis_timesteps(tiny_stack, monkeypatch):
    seen = model_timesteps(tiny_stack, monkeypatch)
    pixels(tiny_stack, render(sampler="DDIM", schedule_type="Automatic", steps=4))
    assert seen == [751, 501, 251]  # 1000 // 4 = 250: the grid 1, 251, 501, 751
    seen.clear()  # PLMS: its first step calls again at the next point
    pixels(tiny_stack, render(sampler="PLMS", schedule_type="Automatic", steps=4))
    assert seen == [751, 501, 501, 251]


def test_plms_from_part_way_follows_the_webuis_img2img(tiny_stack, monkeypatch):
    """An img2img pass starts PLMS afresh at grid[t_enc - 1] (diffusers' own list, sliced,
    repeated a timestep out of place and skipped intervals)."""
    seen = model_timesteps(tiny_stack, monkeypatch)
    from sdbatch import sampling

    scheduler = samplers.make_scheduler(tiny_stack.scheduler_config, "PLMS", "Automatic")
    timeline = txt2img.Timeline(tiny_stack.pipe, render(), 2, tiny_stack.device,
                                tiny_stack.dtype)
    sampling.sample(tiny_stack.pipe.unet, scheduler, noise.randn(1, (1, 4, 8, 8)), 8,
                    lambda call: txt2img.batch_conditioning([timeline], call, None), 5.0,
                    start_step=2, init_latents=torch.zeros(1, 4, 8, 8))  # t_enc 5
    # the grid 1, 126, 251, 376, 501, 626, ...: noised to 626, called from 501
    assert seen == [501, 376, 376, 251, 126]


def test_lcm_takes_the_webuis_steps(tiny_stack, monkeypatch):
    from sdbatch.sampling import lcm_timesteps

    assert lcm_timesteps(4) == [999, 679, 339, 19]
    assert lcm_timesteps(8) == [999, 859, 719, 579, 439, 299, 159, 19]
    seen = model_timesteps(tiny_stack, monkeypatch)
    pixels(tiny_stack, render(sampler="LCM", schedule_type="Automatic", steps=4))
    assert seen == [999, 679, 339, 19]


def test_uniform_on_the_dpm_multistep_samplers_is_the_webuis(tiny_stack, monkeypatch):
    """The WebUI's Uniform takes the model's sigmas at t = linspace(999, 0, steps) (its last
    above 0 is t = 0's); diffusers spread steps + 1 points and dropped the last."""
    seen = model_timesteps(tiny_stack, monkeypatch)
    pixels(tiny_stack, render(sampler="DPM++ 2M", schedule_type="Uniform", steps=4))
    assert seen == [999, 666, 333, 0]
    seen.clear()  # Automatic (Karras) keeps its own
    pixels(tiny_stack, render(sampler="DPM++ 2M", schedule_type="Karras", steps=4))
    assert seen[0] == 999 and seen != [999, 666, 333, 0]


def test_a_lora_tag_in_the_negative_prompt_is_words_as_in_the_webui(tiny_stack):
    """parse_extra_network_prompts takes tags out of the prompts only: the negative's
    <lora:...> is encoded as the text it is and applies nothing."""
    t = txt2img.Timeline(tiny_stack.pipe, render(prompt="a house <lora:x:1>",
                                                 negative_prompt="blurry <lora:x:1>"),
                         1, tiny_stack.device, tiny_stack.dtype)
    assert t.keys[0][1] == "blurry <lora:x:1>"


def test_a_prompts_schedule_texts_are_encoded_as_one_batch_as_in_the_webui(tiny_stack):
    """get_learned_conditioning encodes a prompt's schedule texts together: with emphasis,
    "cat" and "dog" of "(red:1.5) [cat:dog:0.5]" share one mean-restoring factor."""
    pipe = tiny_stack.pipe
    t = txt2img.Timeline(pipe, render(prompt="a (red:1.5) [cat:dog:0.5]", steps=4), 1,
                         tiny_stack.device, tiny_stack.dtype)
    together = txt2img.encode_texts(pipe, ["a (red:1.5) cat", "a (red:1.5) dog"], 1,
                                    tiny_stack.device, tiny_stack.dtype)
    (cat, _), _ = t.at(0)
    (dog, _), _ = t.at(3)
    torch.testing.assert_close(cat, together[0][0])
    torch.testing.assert_close(dog, together[1][0])
    alone, _ = txt2img.encode_text(pipe, "a (red:1.5) dog", 1, tiny_stack.device,
                                   tiny_stack.dtype)
    assert not torch.allclose(dog, alone)
    # [a|b] lists a text per step, repeats and all: cat, dog, cat is the batch at 3 steps
    t = txt2img.Timeline(pipe, render(prompt="a (red:1.5) [cat|dog]", steps=3), 1,
                         tiny_stack.device, tiny_stack.dtype)
    batch = txt2img.encode_texts(pipe, ["a (red:1.5) cat", "a (red:1.5) dog",
                                        "a (red:1.5) cat"], 1, tiny_stack.device,
                                 tiny_stack.dtype)
    (cat, _), _ = t.at(0)
    torch.testing.assert_close(cat, batch[0][0])


def test_a_prompt_and_negative_of_different_lengths_take_separate_passes(tiny_stack,
                                                                        monkeypatch):
    """The WebUI's default (pad_cond_uncond off): a two-chunk prompt and a one-chunk negative
    are two forward passes, each on its own tokens, not one pass padded with the empty
    prompt; equal lengths share one pass."""
    pipe, seen = tiny_stack.pipe, []
    real = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kwargs):
        seen.append(tuple(encoder_hidden_states.shape[:2]))
        return real(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    long = "a red house, " * 30
    txt2img_images(tiny_stack, (render(prompt=long, negative_prompt="blurry", steps=2),))
    assert seen == [(1, 77), (1, 154)] * 2
    seen.clear()
    txt2img_images(tiny_stack, (render(prompt="a red house", negative_prompt="blurry",
                                       steps=2),))
    assert seen == [(2, 77)] * 2
