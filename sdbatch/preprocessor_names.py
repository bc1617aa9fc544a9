"""The ControlNet preprocessors sdbatch runs, by the sd-webui-controlnet extension's module
names, with their sliders' defaults and ranges, and the check that refuses the others.

Torch- and opencv-free on purpose: validating a job reads these tables. The functions
themselves are in sdbatch.preprocessors.

A unit's ``low_threshold`` is the extension's "Threshold A" (its first slider) and
``high_threshold`` its "Threshold B"; what they mean depends on the preprocessor (canny's
low and high thresholds, threshold's binarization level, tile_resample's down sampling
rate...). Unset, each takes the preprocessor's default, as the extension's does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slider:
    label: str
    default: float
    lo: float
    hi: float


HIDDEN = Slider("", 0.5, 0.0, 1.0)  # the extension's hidden slider: written as 0.5


@dataclass(frozen=True)
class Preprocessor:
    name: str
    a: Slider = HIDDEN
    b: Slider = HIDDEN
    uses_resolution: bool = True  # resized to processor_res before it runs


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", uses_resolution=False),
    Preprocessor("canny", Slider("Low Threshold", 100, 1, 255),
                 Slider("High Threshold", 200, 1, 255)),
    Preprocessor("invert", uses_resolution=False),
    Preprocessor("threshold", Slider("Binarization Threshold", 127, 0, 255)),
    Preprocessor("scribble_xdog", Slider("XDoG Threshold", 32, 1, 64)),
    Preprocessor("lineart_standard"),
    Preprocessor("recolor_luminance", Slider("Gamma Correction", 1.0, 0.1, 2.0),
                 uses_resolution=False),
    Preprocessor("recolor_intensity", Slider("Gamma Correction", 1.0, 0.1, 2.0),
                 uses_resolution=False),
    Preprocessor("tile_resample", Slider("Down Sampling Rate", 1.0, 1.0, 8.0),
                 uses_resolution=False),
)}

# the recolor preprocessors, whose maps also replace the finished picture's lightness
RECOLOR = {"recolor_luminance": "lab", "recolor_intensity": "hsv"}

# the words the issue and users say for them -> the extension's module names
ALIASES = {"brightness": "recolor_luminance", "tile": "tile_resample",
           "scribble": "scribble_xdog"}

# the extension's preprocessors that run a neural network (a download sdbatch never makes)
NEEDS_MODEL = ("depth", "openpose", "dw_openpose", "animal_openpose", "densepose", "hed",
               "softedge", "pidinet", "scribble_hed", "scribble_pidinet", "lineart",
               "mlsd", "normal", "seg", "oneformer", "uniformer", "mediapipe", "clip",
               "ip-adapter", "instant_id", "reference", "inpaint", "shuffle", "t2ia",
               "tile_colorfix", "revision", "anime_face", "te_hed", "teed", "mobile_sam",
               "blur_gaussian", "sparsectrl")


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def check(name: str) -> str | None:
    """An error text for a preprocessor sdbatch cannot run, naming the fix."""
    if canonical(name) in PREPROCESSORS:
        return None
    if name.startswith(NEEDS_MODEL):
        hint = (" (lineart_standard is the extension's model-free lineart)"
                if name.startswith("lineart") else "")
        return (f"{name!r} needs a neural network that sdbatch does not download: "
                "preprocess the image elsewhere (the WebUI's preprocessor preview, "
                "controlnet_aux) and give the ready control image with preprocessor: none"
                f"{hint}")
    names = ", ".join([*PREPROCESSORS, *ALIASES])
    return f"must be one of {names}, got {name!r}"


def thresholds(name: str, low: float | None, high: float | None) -> tuple[float, float]:
    """(Threshold A, Threshold B) as the extension uses and writes them: a value given, or
    the slider's default; a slider the preprocessor does not have reads 0.5."""
    p = PREPROCESSORS[canonical(name)]
    return (float(p.a.default if low is None or p.a is HIDDEN else low),
            float(p.b.default if high is None or p.b is HIDDEN else high))


def threshold_problems(name: str, low: float | None, high: float | None) -> list[str]:
    """A threshold outside its slider's range (the extension would silently reset it)."""
    p = PREPROCESSORS[canonical(name)]
    out = []
    for key, value, slider in (("low_threshold", low, p.a), ("high_threshold", high, p.b)):
        if value is None or slider is HIDDEN:
            continue
        if not slider.lo <= value <= slider.hi:
            out.append(f"{key} is {name}'s {slider.label}: {slider.lo:g}..{slider.hi:g}, "
                       f"got {value:g}")
    return out


def pixel_perfect_resolution(raw_w: int, raw_h: int, target_w: int, target_h: int,
                             resize_mode: str) -> int:
    """The extension's pixel perfect processor resolution: the short side the picture has
    once fitted to the target (resize_and_fill: inside it; otherwise covering it)."""
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if resize_mode == "resize_and_fill" else max(k0, k1)
    return round(k * float(min(raw_h, raw_w)))
