import diffusers
import pytest

from sdbatch import samplers
from sdbatch.models.tiny import SCHEDULER


@pytest.mark.parametrize("name,schedule,expected", [
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Karras")),
    ("DPM++ SDE Karras", "Automatic", ("DPM++ SDE", "Karras")),
    ("DPM++ 2M SDE", "Automatic", ("DPM++ 2M SDE", "Exponential")),
    ("Euler a", "Automatic", ("Euler a", "Automatic")),
    ("Euler", "SGM Uniform", ("Euler", "SGM Uniform")),
    ("LMS Karras", "Automatic", ("LMS", "Karras")),
    ("DDIM", "Uniform", ("DDIM", "Uniform")),
])
def test_old_and_new_spellings_resolve_to_one_pair(name, schedule, expected):
    assert samplers.split(name, schedule) == expected


def test_combined_name_contradicting_schedule_type_is_refused():
    with pytest.raises(samplers.SamplerError, match="contradicts"):
        samplers.split("DPM++ 2M Karras", "Exponential")


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
                                  "DDIM", "Heun", "LMS", "UniPC", "DPM2", "DPM2 a", "PLMS"])
def test_every_sampler_builds_from_the_model_config(name):
    sampler, schedule = samplers.split(name)
    scheduler = samplers.make_scheduler(SCHEDULER, sampler, schedule)
    assert type(scheduler).__name__ == samplers.SAMPLERS[name].scheduler
    assert scheduler.config.timestep_spacing == samplers.SAMPLERS[name].spacing
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) >= 5


def test_schedule_types_set_the_scheduler_flags():
    karras = samplers.make_scheduler(SCHEDULER, "DPM++ 2M", "Karras")
    assert karras.config.use_karras_sigmas and not karras.config.use_exponential_sigmas
    expo = samplers.make_scheduler(SCHEDULER, "DPM++ 2M SDE", "Exponential")
    assert expo.config.use_exponential_sigmas
    assert expo.config.algorithm_type == "sde-dpmsolver++"
    plain = samplers.make_scheduler({**SCHEDULER, "use_karras_sigmas": True}, "Euler", "Automatic")
    assert not plain.config.use_karras_sigmas  # the model's flag does not leak through
    sgm = samplers.make_scheduler(SCHEDULER, "Euler", "SGM Uniform")
    assert sgm.config.timestep_spacing == "trailing"


def test_ddim_keeps_sd_leading_spacing():
    ddim = samplers.make_scheduler(SCHEDULER, "DDIM", "Automatic")
    assert isinstance(ddim, diffusers.DDIMScheduler)
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist()[:2] == [901, 801]
