"""A1111 sampler and schedule-type names -> diffusers schedulers.

Users write the WebUI's names: either the old combined form ("DPM++ 2M Karras") or, since
WebUI 1.9, a sampler plus a schedule type ("DPM++ 2M" + "Karras"). Both resolve to one
canonical pair, which is what the infotext records and what builds the scheduler.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # diffusers class name
    settings: dict[str, Any] = field(default_factory=dict)
    automatic: str = "Automatic"  # the schedule type the WebUI picks for "Automatic"
    spacing: str = "linspace"  # k-diffusion samplers space sigmas evenly over the model's t
    stochastic: bool = False


SAMPLERS: dict[str, Sampler] = {
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2}, "Karras"),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", {}, "Karras", stochastic=True),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                            "Exponential", stochastic=True),
    "DPM++ 3M SDE": Sampler("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                            "Exponential", stochastic=True),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", stochastic=True),
    "Euler": Sampler("EulerDiscreteScheduler"),
    "LMS": Sampler("LMSDiscreteScheduler"),
    "Heun": Sampler("HeunDiscreteScheduler"),
    "DPM2": Sampler("KDPM2DiscreteScheduler", {}, "Karras"),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", {}, "Karras", stochastic=True),
    "DDIM": Sampler("DDIMScheduler", {"set_alpha_to_one": False}, spacing="leading"),
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}, spacing="leading"),
    "UniPC": Sampler("UniPCMultistepScheduler"),
    "LCM": Sampler("LCMScheduler", spacing="trailing"),
}

# WebUI samplers that diffusers cannot run, and the nearest one it can.
UNSUPPORTED: dict[str, str] = {
    "DPM++ 2S a": "DPM++ SDE",
    "DPM++ 2M SDE Heun": "DPM++ 2M SDE",
    "DPM fast": "DPM++ 2M",
    "DPM adaptive": "DPM++ 2M",
    "Restart": "DPM++ 2M",
    "DDIM CFG++": "DDIM",
    "Euler CFG++": "Euler",
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


class SamplerError(ValueError):
    pass


def _accepts(sampler: Sampler) -> set[str]:
    return set(inspect.signature(getattr(diffusers, sampler.scheduler).__init__).parameters)


def split(name: str, schedule_type: str = "Automatic") -> tuple[str, str]:
    """Resolve a WebUI name (combined or split) to the canonical (sampler, schedule type).

    "Automatic" becomes the schedule the WebUI would pick for that sampler.
    """
    sampler_name = name
    if name not in SAMPLERS:
        for suffix in ("Karras", "Exponential"):
            base = name.removesuffix(f" {suffix}")
            if base != name and base in SAMPLERS:
                if schedule_type not in ("Automatic", suffix):
                    raise SamplerError(f"'{name}' already names schedule type {suffix}; "
                                       f"it contradicts schedule_type '{schedule_type}'")
                sampler_name, schedule_type = base, suffix
                break
    if sampler_name not in SAMPLERS:
        raise SamplerError(_unknown_sampler(name))
    if schedule_type not in SCHEDULE_TYPES:
        raise SamplerError(_unknown_schedule(schedule_type))
    sampler = SAMPLERS[sampler_name]
    if schedule_type == "Automatic":
        schedule_type = sampler.automatic
    settings = SCHEDULE_TYPES[schedule_type] or {}
    if not set(settings) <= _accepts(sampler):
        valid = [s for s, kw in SCHEDULE_TYPES.items() if not kw or set(kw) <= _accepts(sampler)]
        raise SamplerError(f"sampler '{sampler_name}' cannot use schedule type "
                           f"'{schedule_type}'; it takes: {', '.join(valid)}")
    return sampler_name, schedule_type


def _unknown_sampler(name: str) -> str:
    if name in UNSUPPORTED:
        return (f"'{name}' is a WebUI sampler that diffusers cannot run; the nearest one is "
                f"'{UNSUPPORTED[name]}'")
    combined = [f"{s} {t}" for s in SAMPLERS for t in ("Karras", "Exponential")]
    close = difflib.get_close_matches(name, list(SAMPLERS) + combined, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"unknown sampler '{name}'; {hint}valid: {', '.join(SAMPLERS)} "
            "(a schedule type may follow the name, e.g. 'DPM++ 2M Karras')")


def _unknown_schedule(name: str) -> str:
    return f"unknown schedule type '{name}'; valid: {', '.join(SCHEDULE_TYPES)}"


def check_sampler(name: str) -> str | None:
    """Schema check: None if the name (with or without a schedule suffix) is known."""
    try:
        split(name)
    except SamplerError as e:
        if "cannot use schedule type" in str(e):
            return None  # the pair is checked once both keys are known
        return str(e)
    return None


def check_schedule_type(name: str) -> str | None:
    return None if name in SCHEDULE_TYPES else _unknown_schedule(name)


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
