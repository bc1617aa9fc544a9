"""Canonical A1111 (sampler, schedule type) pairs -> diffusers schedulers.

The names and their checks live in sampler_names.py, which imports no diffusers, so that
validating a job stays fast; split() resolves a user's spelling to the pair built here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers

from sdbatch.sampler_names import SamplerError, split  # noqa: F401 - the names' API, here too


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # diffusers class name
    settings: dict[str, Any] = field(default_factory=dict)
    spacing: str = "linspace"  # k-diffusion samplers space sigmas evenly over the model's t
    stochastic: bool = False


SAMPLERS: dict[str, Sampler] = {
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", {}, stochastic=True),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                            stochastic=True),
    "DPM++ 2M SDE Heun": Sampler("DPMSolverMultistepScheduler",
                                 {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                  "solver_type": "heun"}, stochastic=True),
    "DPM++ 3M SDE": Sampler("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                            stochastic=True),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", stochastic=True),
    "Euler": Sampler("EulerDiscreteScheduler"),
    "LMS": Sampler("LMSDiscreteScheduler"),
    "Heun": Sampler("HeunDiscreteScheduler"),
    "DPM2": Sampler("KDPM2DiscreteScheduler"),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", stochastic=True),
    "DDIM": Sampler("DDIMScheduler", {"set_alpha_to_one": False}, spacing="leading"),
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}, spacing="leading"),
    # the WebUI's uni_pc_variant and order; like it, ending at t = 0, sigma_min (bh1's last
    # step to sigma 0 breaks down: a black picture)
    "UniPC": Sampler("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3,
                                                 "final_sigmas_type": "sigma_min"}),
    "LCM": Sampler("LCMScheduler", spacing="trailing"),
}

# schedule type -> scheduler settings; None = keep the model's own sigmas
SCHEDULE_TYPES: dict[str, dict[str, Any] | None] = {
    "Automatic": None,
    "Uniform": None,
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}


def _accepts(sampler: Sampler) -> set[str]:
    return set(inspect.signature(getattr(diffusers, sampler.scheduler).__init__).parameters)


def is_stochastic(sampler_name: str) -> bool:
    return SAMPLERS[sampler_name].stochastic


def make_scheduler(base_config: dict[str, Any], sampler_name: str, schedule_type: str):
    """A scheduler built from the model's own scheduler config plus the sampler's settings.

    timestep_spacing is always set: its default differs between scheduler classes.
    """
    sampler = SAMPLERS[sampler_name]
    cls = getattr(diffusers, sampler.scheduler)
    accepted = _accepts(sampler)
    config = {k: v for k, v in base_config.items() if not k.startswith("_") and k in accepted}
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        config.pop(flag, None)
    config["timestep_spacing"] = sampler.spacing
    if sampler.spacing == "leading":
        config["steps_offset"] = 1
    config.update(sampler.settings)
    config.update(SCHEDULE_TYPES[schedule_type] or {})
    return cls(**{k: v for k, v in config.items() if k in accepted})
