"""The torch-free name tables agree with the diffusers schedulers they stand for."""

import inspect

import diffusers
import pytest

from sdbatch import sampler_names, samplers


def test_the_same_samplers_and_schedule_types_on_both_sides():
    assert list(sampler_names.SAMPLERS) == list(samplers.SAMPLERS)
    assert sampler_names.SCHEDULE_TYPES == tuple(samplers.SCHEDULE_TYPES)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_schedule_types_a_sampler_takes_are_those_its_scheduler_accepts(name):
    cls = getattr(diffusers, samplers.SAMPLERS[name].scheduler)
    accepted = set(inspect.signature(cls.__init__).parameters)
    takes = [t for t, kw in samplers.SCHEDULE_TYPES.items() if not kw or set(kw) <= accepted]
    automatic, listed = sampler_names.SAMPLERS[name]
    if name in ("DDIM", "PLMS", "UniPC"):  # the WebUI's own timestep samplers read none
        assert listed == ("Automatic", "Uniform")
    else:
        assert list(listed) == takes
    assert automatic in takes and set(listed) <= set(takes)


def test_a_schedule_type_in_the_wrong_case_is_pointed_to_its_name():
    from sdbatch.sampler_names import check_schedule_type

    assert "unknown schedule type 'karras'; did you mean 'Karras'?" in check_schedule_type("karras")
    assert "did you mean 'Exponential'?" in check_schedule_type("Exponental")
    assert check_schedule_type("Karras") is None
