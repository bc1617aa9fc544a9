import hashlib

from sdbatch import matrix
from sdbatch.plan import content_key, make_plan
from sdbatch.schema import validate


def plan_of(raw, batch_size=2):
    job = validate(raw)
    rs = matrix.expand(matrix.resolve_seeds(job, 0))
    return rs, make_plan(rs, {"tiny": "stack-a"}, batch_size)


def test_calls_differing_only_in_seed_or_prompt_share_a_batch():
    rs, plan = plan_of({"prompt": ["a", "b", "c"], "params": {"seed": 1, "cfg_scale": [5, 7]}})
    for batch in plan.batches:
        assert len({r.cfg_scale for r in batch.renders}) == 1
        assert len(batch.renders) <= 2
    assert sorted(r.index for b in plan.batches for r in b.renders) == list(range(6))
    cfg5 = [b for b in plan.batches if b.renders[0].cfg_scale == 5]
    assert [len(b.renders) for b in cfg5] == [2, 1]


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
