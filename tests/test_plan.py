import hashlib
import math

import pytest

from sdbatch import matrix
from sdbatch.plan import content_key, make_plan
from sdbatch.schema import validate


def plan_of(raw, max_batch=2):
    job = validate(raw)
    rs = matrix.expand(matrix.resolve_seeds(job, 0))
    return rs, make_plan(rs, {"tiny": "stack-a"}, max_batch)


@pytest.mark.parametrize("max_batch", [1, 5, 8, 24])
def test_calls_differing_in_seed_prompt_negative_or_cfg_share_passes_of_max_batch(max_batch):
    """2 prompts x 2 negatives x 2 CFG x 3 seeds: 24 calls that may all share a pass, so
    ceil(24 / max_batch) passes, of sizes that differ by one at most, in image order."""
    rs, plan = plan_of({"prompt": ["a", "b"], "negative_prompt": ["x", "y"],
                        "params": {"seed": [1, 2, 3], "cfg_scale": [5, 7]}}, max_batch)
    sizes = [len(b.renders) for b in plan.batches]
    assert len(sizes) == math.ceil(24 / max_batch) and max(sizes) == min(max_batch, 24)
    assert max(sizes) - min(sizes) <= 1
    assert [r.index for b in plan.batches for r in b.renders] == list(range(24))
    first = plan.batches[0].renders
    assert len({(r.prompt, r.negative_prompt, r.cfg_scale, r.seed) for r in first}) == \
        min(max_batch, 24)


def test_passes_are_as_few_as_max_batch_allows_and_even():
    from sdbatch.plan import pass_bounds

    assert pass_bounds(12, 8) == [(0, 6), (6, 12)]  # two workers get equal halves
    assert pass_bounds(13, 4) == [(0, 4), (4, 7), (7, 10), (10, 13)]
    assert pass_bounds(3, 8) == [(0, 3)] and pass_bounds(5, 1) == [(i, i + 1) for i in range(5)]


def test_params_batch_size_makes_images_not_passes():
    """batch_size keeps its WebUI meaning: 2 cells x 3 images; the 6 share one pass."""
    rs, plan = plan_of({"prompt": ["a", "b"], "params": {"seed": 10, "batch_size": 3}}, 8)
    assert [r.seed for r in rs] == [10, 11, 12, 10, 11, 12]
    assert [[r.index for r in b.renders] for b in plan.batches] == [list(range(6))]


def test_calls_differing_in_what_the_pass_shares_never_share_one():
    rs, plan = plan_of({"prompt": "a", "params": {"seed": [1, 2], "steps": [4, 6],
                                                  "sampler": ["Euler", "DDIM"]}}, 8)
    for batch in plan.batches:
        assert len({(r.steps, r.sampler) for r in batch.renders}) == 1
    assert len(plan.batches) == 4


def test_grouping_is_a_function_of_the_job():
    """Random seeds (drawn from each run's nonce) change no batch: the same indices go
    together, in the known order, whatever the nonce."""
    job = validate({"prompt": ["a", "b"], "params": {"seed": [1, -1, 3]}})
    groupings = []
    for nonce in (0, 987654321):
        rs = matrix.expand(matrix.resolve_seeds(job, nonce))
        plan = make_plan(rs, {"tiny": "stack-a"}, 2)
        groupings.append([[r.index for r in b.renders] for b in plan.batches])
    assert groupings[0] == groupings[1] == [[0, 1], [2, 3], [4, 5]]


def test_content_keys_follow_parameters_and_stack():
    rs, plan = plan_of({"prompt": "a", "params": {"seed": [1, 2]}})
    assert plan.key(0) != plan.key(1)
    # the same image reached through another job shape has the same key: keys are content
    rs2, plan2 = plan_of({"prompt": ["b", "a"], "params": {"seed": 1}})
    assert rs2[1].params() == rs[0].params() and plan2.key(1) == plan.key(0)
    assert plan.key(0) == content_key("txt2img", plan.chains[0][0].params, None, "stack-a")
    other = make_plan(rs, {"tiny": "stack-b"}, 2)
    assert other.key(0) != plan.key(0)


def test_content_key_is_a_sha256_of_the_call():
    """Known value: keys in manifests stay valid across versions that keep this format."""
    blob = '["txt2img",{"seed":1,"steps":4},null,"s"]'
    assert content_key("txt2img", {"steps": 4, "seed": 1}, None, "s") == \
        hashlib.sha256(blob.encode()).hexdigest()[:24]


def test_each_picture_read_is_a_batch_of_its_own():
    """A read shares no forward pass; alone, a file broken after the checks fails only the
    images made from it (it failed the other picture's images too, 'its input failed')."""
    from sdbatch.plan import InputImage

    job = validate({"init_image": ["a.png", "b.png"], "params": {"seed": [1, 2]},
                    "post": [{"img2img": {"denoise": 0.5}}]})
    rs = matrix.expand(matrix.resolve_seeds(job, 0))
    plan = make_plan(rs, {"tiny": "stack-a"}, 8, {}, {"a.png": InputImage("1", (64, 64)),
                                                     "b.png": InputImage("2", (64, 64))})
    reads = [b for b in plan.batches if b.kind == "image"]
    assert [[c.params["path"] for c in b.calls] for b in reads] == [["a.png"], ["b.png"]]
    assert max(len(b.calls) for b in plan.batches if b.kind == "img2img") == 4  # still shared
