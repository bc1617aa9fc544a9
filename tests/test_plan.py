from sdbatch import matrix
from sdbatch.plan import make_plan
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
    _, a = plan_of({"prompt": ["a", "b"], "params": {"seed": [1, 2, 3]}})
    _, b = plan_of({"prompt": ["a", "b"], "params": {"seed": [1, 2, 3]}})
    assert [[r.index for r in x.renders] for x in a.batches] == \
        [[r.index for r in x.renders] for x in b.batches]


def test_content_keys_follow_parameters_and_stack():
    rs, plan = plan_of({"prompt": "a", "params": {"seed": [1, 2]}})
    assert plan.key(0) != plan.key(1)
    rs2, plan2 = plan_of({"prompt": "a", "params": {"seed": [1, 2]}})
    assert plan.key(0) == plan2.key(0)
    other = make_plan(rs, {"tiny": "stack-b"}, 2)
    assert other.key(0) != plan.key(0)
