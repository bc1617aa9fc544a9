from sdbatch import matrix
from sdbatch.schema import validate


def renders(raw, nonce=0):
    return matrix.expand(matrix.resolve_seeds(validate(raw), nonce))


def test_axes_are_crossed_first_axis_outermost():
    rs = renders({"prompt": ["a", "b"], "params": {"cfg_scale": [5, 7, 9], "seed": 1}})
    assert [(r.prompt, r.cfg_scale) for r in rs] == [
        ("a", 5), ("a", 7), ("a", 9), ("b", 5), ("b", 7), ("b", 9)]
    assert [r.index for r in rs] == list(range(6))
    assert [r.cell for r in rs] == list(range(6))


def test_zip_pairs_axes_instead_of_crossing():
    rs = renders({"prompt": ["a", "b"], "params": {"seed": [1234, 5678], "cfg_scale": [5, 7, 9]},
                  "zip": [["prompt", "seed"]]})
    assert len(rs) == 6
    assert {(r.prompt, r.seed) for r in rs} == {("a", 1234), ("b", 5678)}


def test_batch_count_and_size_give_consecutive_seeds_as_in_the_webui():
    rs = renders({"params": {"seed": 100, "batch_count": 2, "batch_size": 3}})
    assert [r.seed for r in rs] == [100, 101, 102, 103, 104, 105]
    assert {r.cell for r in rs} == {0}


def test_random_seed_is_drawn_from_the_nonce_and_reproducible():
    a = renders({"params": {"seed": [-1, -1, 7]}}, nonce=42)
    b = renders({"params": {"seed": [-1, -1, 7]}}, nonce=42)
    c = renders({"params": {"seed": [-1, -1, 7]}}, nonce=43)
    assert [r.seed for r in a] == [r.seed for r in b]
    assert a[0].seed != a[1].seed and a[2].seed == 7
    assert [r.seed for r in a][:2] != [r.seed for r in c][:2]
    assert all(0 <= r.seed <= 4294967294 for r in a)


def test_count_is_known_before_seeds():
    job = validate({"prompt": ["a", "b", "c"], "params": {"steps": [10, 20], "batch_count": 2}})
    assert matrix.count(job) == 12 == len(renders(matrix.schema.to_dict(job)))


def test_sampler_names_are_canonical_in_renders():
    [r] = renders({"params": {"sampler": "DPM++ 2M Karras", "seed": 1}})
    assert (r.sampler, r.schedule_type) == ("DPM++ 2M", "Karras")


def test_seed_resize_eta_and_ensd_are_axes_too():
    rs = renders({"params": {"sampler": "DDIM", "seed": 1, "eta": [0, 0.5], "ensd": [0, 31337],
                             "seed_resize_from_w": [0, 128], "seed_resize_from_h": [0, 96]},
                  "zip": [["seed_resize_from_w", "seed_resize_from_h"]]})
    assert [(r.seed_resize_from_w, r.seed_resize_from_h, r.eta, r.ensd) for r in rs] == [
        (w, h, eta, ensd) for w, h in ((0, 0), (128, 96)) for eta in (0.0, 0.5)
        for ensd in (0, 31337)]


def test_images_that_differ_in_eta_never_share_a_forward_pass():
    """eta is the scheduler's, one per pass; seed resize and ENSD are per image."""
    from sdbatch.plan import make_plan

    rs = renders({"params": {"sampler": "DDIM", "seed": 1, "eta": [0, 0.5], "ensd": [0, 7]}})
    plan = make_plan(rs, {"tiny": "stack"}, max_batch=4)
    assert [[r.eta for r in b.renders] for b in plan.batches] == [[0.0, 0.0], [0.5, 0.5]]
    assert [[r.ensd for r in b.renders] for b in plan.batches] == [[0, 7], [0, 7]]


def test_a_steps_seed_counts_up_only_as_the_images_do():
    """With a variation strength the images keep the seed and count the variation seed up;
    a step's own seed does the same (it stays)."""
    def step_seeds(strength):
        rs = renders({"params": {"seed": 100, "batch_size": 3, "subseed": 7,
                                 "subseed_strength": strength},
                      "post": [{"img2img": {"seed": 50}}]})
        return [dict(r.post[0].values)["seed"] for r in rs]

    assert step_seeds(0) == [50, 51, 52]
    assert step_seeds(0.5) == [50, 50, 50]


def test_an_embedding_named_only_in_a_steps_prompt_is_loaded_for_it():
    """tiny's embedding 'nightsky' in an img2img step's prompt: the image's stack loads it
    (it was encoded as plain words, silently)."""
    from sdbatch import model_specs

    raw = {"model": {"checkpoint": "tiny"}, "prompt": "a red building",
           "params": {"seed": 1}, "post": [{"img2img": {"prompt": "nightsky, a red building"}}]}
    [r] = renders(raw)
    assert r.embeddings == ("nightsky",)
    job = validate(raw)
    spec, problems = model_specs.resolve(job.model, job.paths, "tiny")
    assert problems == []
    [with_it] = model_specs.with_embeddings({"tiny": spec}, [r], job).values()
    assert [p.stem for p in with_it.embeddings] == ["nightsky"]


def test_a_step_that_sets_only_its_sampler_takes_the_images_schedule_type():
    """The WebUI's hires "use same scheduler": the image's schedule type as the job asked
    it, where the step's sampler takes it (Euler a takes no Karras in diffusers)."""
    def step(params, post):
        [r] = renders({"params": {"seed": 1, **params}, "post": [{"hires_fix": post}]})
        return dict(r.post[0].values)["sampler"], dict(r.post[0].values)["schedule_type"]

    assert step({"sampler": "DPM++ 2M", "schedule_type": "Exponential"},
                {"sampler": "Euler"}) == ("Euler", "Exponential")
    assert step({"sampler": "DPM++ 2M Karras"}, {"sampler": "Euler"}) == ("Euler", "Karras")
    assert step({"sampler": "DPM++ 2M Karras"}, {"sampler": "Euler a"}) == ("Euler a",
                                                                          "Automatic")
    # a step's own schedule type replaces the one the job's old combined name carries
    assert step({"sampler": "DPM++ 2M Karras"},
                {"schedule_type": "Exponential"}) == ("DPM++ 2M", "Exponential")


def test_zipped_samplers_and_schedule_types_are_checked_as_pairs():
    rs = renders({"params": {"sampler": ["Euler a", "DPM++ 2M"], "seed": 1,
                             "schedule_type": ["Automatic", "Karras"]},
                  "zip": [["sampler", "schedule_type"]]})
    assert [(r.sampler, r.schedule_type) for r in rs] == [("Euler a", "Automatic"),
                                                          ("DPM++ 2M", "Karras")]
    import pytest

    from sdbatch.schema import JobError

    with pytest.raises(JobError, match="'Euler a' cannot use schedule type 'Karras'"):
        validate({"params": {"sampler": ["Euler a", "DPM++ 2M"],
                             "schedule_type": ["Automatic", "Karras"]}})  # crossed


def test_a_lora_tagged_twice_is_applied_twice_with_the_last_weights_as_the_webui():
    """The WebUI appends the network once per tag, each time with the last tag's
    multipliers, and adds its delta once per entry."""
    job = validate({"prompt": "x"})
    loras, _ = matrix.networks(job, "a <lora:x:0.5> house <lora:x:1>")
    assert loras == (("x", 2.0),)
    loras, _ = matrix.networks(job, "<lora:x:0.3:0.1> <lora:y:0.7> <lora:x:1:0.5>")
    assert loras == (("x", (2.0, 1.0)), ("y", 0.7))
