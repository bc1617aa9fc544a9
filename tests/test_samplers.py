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


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
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


def test_unipc_is_the_webuis_variant_and_order():
    unipc = samplers.make_scheduler(SCHEDULER, "UniPC", "Automatic")
    assert (unipc.config.solver_type, unipc.config.solver_order,
            unipc.config.final_sigmas_type) == ("bh1", 3, "sigma_min")


def test_dpm_2m_sde_heun_is_the_2m_sde_with_heun_steps():
    heun = samplers.make_scheduler(SCHEDULER, *samplers.split("DPM++ 2M SDE Heun"))
    assert (heun.config.algorithm_type, heun.config.solver_type) == ("sde-dpmsolver++", "heun")
    assert heun.config.use_exponential_sigmas and samplers.is_stochastic("DPM++ 2M SDE Heun")


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC"])
def test_the_webuis_timestep_samplers_take_no_schedule_type(name):
    """The WebUI's DDIM, PLMS and UniPC never read the schedule type: a Karras UniPC would
    be an image the WebUI cannot make."""
    for schedule in ("Karras", "Exponential", "SGM Uniform"):
        with pytest.raises(samplers.SamplerError, match="cannot use schedule type"):
            samplers.split(name, schedule)
