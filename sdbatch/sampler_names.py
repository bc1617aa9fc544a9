"""The WebUI's sampler and schedule-type names, and the checks on them.

Torch-free on purpose: validating a job reads these tables and must not import diffusers
(seconds on a small machine). samplers.py maps the same names to diffusers schedulers;
tests/test_sampler_names.py keeps the two in step.

Users write either the old combined form ("DPM++ 2M Karras") or, since WebUI 1.9, a sampler
plus a schedule type ("DPM++ 2M" + "Karras"). Both resolve to one canonical pair.
"""

from __future__ import annotations

import difflib

SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Beta", "SGM Uniform")
_ALL = SCHEDULE_TYPES
_NO_SIGMAS = ("Automatic", "Uniform", "SGM Uniform")  # schedulers without sigma options
_TIMESTEPS = ("Automatic", "Uniform")  # the WebUI's own DDIM/PLMS/UniPC read no schedule type

# sampler -> (the schedule type the WebUI picks for "Automatic", the schedule types its
# diffusers scheduler can take)
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DPM++ 2M": ("Karras", _ALL),
    "DPM++ SDE": ("Karras", _ALL),
    "DPM++ 2M SDE": ("Exponential", _ALL),
    "DPM++ 2M SDE Heun": ("Exponential", _ALL),
    "DPM++ 3M SDE": ("Exponential", _ALL),
    "Euler a": ("Automatic", _NO_SIGMAS),
    "Euler": ("Automatic", _ALL),
    "LMS": ("Automatic", _ALL),
    "Heun": ("Automatic", _ALL),
    "DPM2": ("Karras", _ALL),
    "DPM2 a": ("Karras", _ALL),
    "DDIM": ("Automatic", _TIMESTEPS),
    "PLMS": ("Automatic", _TIMESTEPS),
    "UniPC": ("Automatic", _TIMESTEPS),
    "LCM": ("Automatic", _NO_SIGMAS),
}

# WebUI samplers that diffusers cannot run, and the nearest one it can.
UNSUPPORTED: dict[str, str] = {
    "DPM++ 2S a": "DPM++ SDE",
    "DPM fast": "DPM++ 2M",
    "DPM adaptive": "DPM++ 2M",
    "Restart": "DPM++ 2M",
    "DDIM CFG++": "DDIM",
    "Euler CFG++": "Euler",
}


class SamplerError(ValueError):
    pass


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
    automatic, takes = SAMPLERS[sampler_name]
    if schedule_type == "Automatic":
        schedule_type = automatic
    if schedule_type not in takes:
        raise SamplerError(f"sampler '{sampler_name}' cannot use schedule type "
                           f"'{schedule_type}'; it takes: {', '.join(takes)}")
    return sampler_name, schedule_type


def given_schedule(name: str, schedule_type: str) -> str:
    """The schedule type a WebUI name and schedule_type ask for, Automatic unresolved (a
    step that inherits it resolves it for its own sampler)."""
    for suffix in ("Karras", "Exponential"):
        if name not in SAMPLERS and name.removesuffix(f" {suffix}") in SAMPLERS \
                and name.endswith(f" {suffix}"):
            return suffix
    return schedule_type


def inherited(sampler: str, schedule_type: str) -> str:
    """A step's schedule type when it sets only its sampler: the image's, as the WebUI's
    "use same scheduler", where the step's sampler takes it; else Automatic (a schedule the
    step's sampler cannot run in diffusers, or one its own name already says)."""
    try:
        split(sampler, schedule_type)
    except SamplerError:
        return "Automatic"
    return schedule_type


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
    by_case = {t.lower(): t for t in SCHEDULE_TYPES}
    close = [by_case[name.lower()]] if name.lower() in by_case else \
        difflib.get_close_matches(name, list(SCHEDULE_TYPES), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown schedule type '{name}'; {hint}valid: {', '.join(SCHEDULE_TYPES)}"


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
