"""The one schema of a job: what a job may hold, its defaults, and every check that can run
before a model is loaded.

A field typed ``Axis[T]`` takes one value or a list of values; a list is a grid axis. The
validator collects every problem at once, each naming its key and the file (or command-line
override) it came from, so a user fixes a job in one go instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from sdbatch import preprocessor_names, sampler_names
from sdbatch.output.filenames import RESERVED, check_pattern

T = TypeVar("T")
Axis = Union[T, tuple[T, ...]]  # noqa: UP007 - a value, or a list of values: a grid axis

MAX_SEED = 4294967294  # the WebUI's seed range is 0..4294967294; -1 asks for a random one


def _range(lo: float | None = None, hi: float | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if lo is not None and v < lo:
            return f"must be at least {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be at most {hi}, got {v}"
        return None

    return check


def _size(v: int) -> str | None:
    if v < 64:
        return f"must be at least 64, got {v}"
    if v % 8:
        lo, hi = v - v % 8, v - v % 8 + 8
        return f"must be a multiple of 8 (the VAE downscales by 8), got {v}: use {lo} or {hi}"
    return None


def _seed(v: int) -> str | None:
    if v < -1 or v > MAX_SEED:
        return f"must be -1 (random) or 0..{MAX_SEED}, got {v}"
    return None


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"

    return check


def spec(default: Any = dataclasses.MISSING, check: Callable | None = None,
         read: Callable[[Any], Any] | None = None, not_an_axis: str | None = None,
         **kw: Any) -> Any:
    """A field with an optional value check (returns an error text or None), an optional
    reader that turns a YAML value into the field's type first (true -> "true"), and for a
    key that is no axis, how to sweep it instead (said when it is given a list)."""
    if isinstance(default, list | dict):
        kw["default_factory"] = (lambda d=default: type(d)(d))
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"check": check, "read": read, "not_an_axis": not_an_axis}, **kw)


_LORA_SWEEP = ("a stack's LoRA weight is not an axis: sweep a prompt axis of tags instead, "
               "e.g. prompt: ['x <lora:NAME:0.5>', 'x <lora:NAME:1>']")


def _folder_name(v: str) -> str | None:
    """A job name is one plain folder under outputs/ on every system: no path, nothing
    Windows refuses (trailing dots or spaces, CON, NUL...)."""
    bad = sorted({c for c in v if not (c.isalnum() or c in "-_. ")})
    fix = "use letters, digits, '-', '_', '.' and spaces"
    if bad:
        return f"must be a plain folder name, got {v!r} (it has {' '.join(bad)}): {fix}"
    if not v.strip(" ."):
        return f"must be a plain folder name, got {v!r}: {fix}"
    if v != v.strip(" ."):
        return f"must not begin or end with a space or a dot, got {v!r}"
    if v.split(".")[0].upper() in RESERVED:
        return f"{v!r} is a name Windows reserves for a device; choose another"
    if len(v) > 100:
        return f"must be at most 100 characters, got {len(v)}"
    return None


@dataclass(frozen=True)
class JobInfo:
    name: str = spec("sdbatch", _folder_name)  # outputs/<name>/: one folder, never a path


TILING = ("false", "true", "x", "y")


def _tiling_word(v: Any) -> Any:
    """YAML's true/false (or a list of them) as the tiling words."""
    if isinstance(v, list | tuple):
        return [_tiling_word(x) for x in v]
    return str(v).lower() if isinstance(v, bool) else v


@dataclass(frozen=True)
class Params:
    """Generation parameters, in the WebUI's words and with its UI defaults."""

    sampler: Axis[str] = spec("DPM++ 2M", sampler_names.check_sampler)
    schedule_type: Axis[str] = spec("Automatic", sampler_names.check_schedule_type)
    steps: Axis[int] = spec(20, _range(1, 1000))
    cfg_scale: Axis[float] = spec(7.0, _range(0, 100))
    seed: Axis[int] = spec(-1, _seed)
    width: Axis[int] = spec(512, _size)
    height: Axis[int] = spec(512, _size)
    clip_skip: Axis[int] = spec(1, _range(1, 12))
    subseed: Axis[int] = spec(-1, _seed)  # the variation seed
    subseed_strength: Axis[float] = spec(0.0, _range(0, 1))
    seed_resize_from_w: Axis[int] = spec(0, _range(0))  # 0 = off; noise as if drawn at this size
    seed_resize_from_h: Axis[int] = spec(0, _range(0))
    eta: Axis[float] | None = spec(None, _range(0, 1))  # DDIM's (diffusers' others take none)
    ensd: Axis[int] = spec(0, _range(0))  # eta noise seed delta: later noise from seed + ensd
    tiling: Axis[str] = spec("false", _one_of(TILING), _tiling_word)  # seamless: true, x or y
    batch_size: int = spec(1, _range(1, 64))
    batch_count: int = spec(1, _range(1, 100000))


DYNAMIC_MODES = ("combinatorial", "random", "off")


@dataclass(frozen=True)
class DynamicPrompts:
    """{a|b} variants and __wildcard__ files (the dynamicprompts library's syntax)."""

    mode: str = spec("combinatorial", _one_of(DYNAMIC_MODES))
    max_variants: int = spec(1000, _range(1))  # per prompt, combinatorial mode


@dataclass(frozen=True)
class Network:
    """A LoRA or hypernetwork of the stack: a name under paths.models (or a path) and a weight."""

    name: str = spec(not_an_axis="a stack's network is not an axis: give one entry per file")
    weight: float = spec(1.0, _range(-10, 10), not_an_axis=(
        "a hypernetwork's strength is not an axis: sweep a prompt axis of "
        "<hypernet:NAME:STRENGTH> tags instead"))


@dataclass(frozen=True)
class Lora:
    """A LoRA of the stack. te_weight / unet_weight set the text encoders' and the UNet's
    weights apart, as the WebUI's <lora:name:te:unet> tag does; each defaults to weight."""

    name: str = spec(not_an_axis=("a stack's LoRA is not an axis: give one entry per "
                                  "file, or sweep a prompt axis of <lora:NAME:W> tags"))
    weight: float = spec(1.0, _range(-10, 10), not_an_axis=_LORA_SWEEP)
    te_weight: float | None = spec(None, _range(-10, 10), not_an_axis=_LORA_SWEEP)
    unet_weight: float | None = spec(None, _range(-10, 10), not_an_axis=_LORA_SWEEP)

    def parts(self) -> tuple[float, float]:
        """(text encoder, UNet) weights."""
        return (self.weight if self.te_weight is None else self.te_weight,
                self.weight if self.unet_weight is None else self.unet_weight)


FAMILIES = ("auto", "sd15", "sd2", "sd2-v", "sdxl")


@dataclass(frozen=True)
class Model:
    """The model stack. ``tiny`` is the embedded demonstration model built by sdbatch.

    Names resolve like the WebUI's: a bare name (with or without extension) is looked up in
    the matching subfolder of paths.models; a path works as is.
    """

    checkpoint: Axis[str] = spec("tiny")
    family: str = spec("auto", _one_of(FAMILIES))
    config: str | None = spec(None)  # a diffusers folder describing a single file of no family
    vae: str | None = spec(None)
    loras: tuple[Lora, ...] = spec(())
    embeddings: tuple[str, ...] = spec(())
    hypernetworks: tuple[Network, ...] = spec(())
    dtype: str = spec("auto", _one_of(("auto", "float32", "float16", "bfloat16")))
    allow_pickle: bool = spec(False)


@dataclass(frozen=True)
class Paths:
    models: str | None = spec(None)  # an A1111 models folder: Stable-diffusion/ VAE/ Lora/ ...
    wildcards: str = spec("wildcards")  # __name__ -> wildcards/name.txt (also .yaml/.json)
    styles: str = spec("styles.csv")  # the WebUI's styles.csv: name,prompt,negative_prompt


EXECUTORS = ("local", "multi", "ray", "slurm")


@dataclass(frozen=True)
class Executor:
    """Where and how fast the plan runs; no key here changes a pixel except ``max_batch``
    (recorded in run.json) and the speed switches the README names."""

    name: str = spec("local", _one_of(EXECUTORS))  # a config group: executor=multi
    device: str = spec("auto")  # local, ray, slurm: auto (cuda if present), cpu, cuda:1, mps
    threads: int = spec(0, _range(0))  # torch threads per worker; 0 = torch's default
    max_batch: int = spec(8, _range(1))  # images of one forward pass (seed/prompt/CFG differ)
    stack_cache_gb: float = spec(0.0, _range(0))  # loaded stacks kept beyond the one in use
    intermediate_cache_gb: float = spec(1.0, _range(0))  # post-step inputs kept in memory
    vae_tile_px: int = spec(1024, _range(64))  # VAE works in tiles above this many pixels a side
    upscaler_tile_px: int = spec(192, _range(0))  # upscaler models run in tiles this big; 0 = whole
    upscaler_tile_overlap: int = spec(8, _range(0, 256))  # px the tiles share, blended
    compile: bool = spec(False)  # torch.compile the UNet (pays off on long GPU runs)
    channels_last: bool = spec(False)  # UNet and VAE in channels_last memory format
    deterministic: bool = spec(False)  # torch deterministic algorithms (CI renders; slower)
    fuse_loras: bool = spec(False)  # fuse fixed LoRA weights into the model for a stretch
    devices: tuple[str, ...] | None = spec(None)  # multi: one worker per device; None = every GPU
    address: str | None = spec(None)  # ray: None = a local cluster for the run; auto; ray://h:p
    workers: int = spec(0, _range(0))  # ray: actors; 0 = one per GPU of the cluster (or 1)
    num_gpus: float = spec(1.0, _range(0))  # ray: GPUs per actor (0: CPU actors)
    num_cpus: float = spec(1.0, _range(0))  # ray: CPUs per actor
    shared_dir: str | None = spec(None)  # ray: actors write images here, the driver records
    partition: str | None = spec(None)  # slurm: the partition to submit to
    shards: int = spec(1, _range(1))  # slurm: array tasks the matrix is split into
    cluster: str = spec("slurm", _one_of(("slurm", "local")))  # slurm: local = test array
    timeout_min: int = spec(240, _range(1))  # slurm: each array task's time limit
    gpus_per_task: int = spec(1, _range(0))  # slurm
    cpus_per_task: int = spec(4, _range(1))  # slurm
    mem_gb: float = spec(32.0, _range(1))  # slurm: memory per task


EXECUTOR_KEYS = {  # keys that only one executor reads; set for another, they are refused
    "multi": ("devices",),
    "ray": ("address", "workers", "num_gpus", "num_cpus", "shared_dir"),
    "slurm": ("partition", "shards", "cluster", "timeout_min", "gpus_per_task",
              "cpus_per_task", "mem_gb"),
}


def on_executor(executor: dict[str, Any], name: str) -> dict[str, Any]:
    """A stored job's executor keys for running it on executor ``name`` (a resume on
    another, verify's local render): the keys only the others read are dropped, since
    they would be refused."""
    others = {k for n, keys in EXECUTOR_KEYS.items() if n != name for k in keys}
    return {**{k: v for k, v in executor.items() if k not in others}, "name": name}


@dataclass(frozen=True)
class Run:
    dir: str | None = spec(None)
    max_images: int = spec(1000, _range(1))
    filename: str = spec("[index]-[seed]", check_pattern)
    progress: str = spec("bar", _one_of(("bar", "steps", "quiet")))
    allow_device_change: bool = spec(False)  # resume on another device type or dtype
    keep_intermediates: bool = spec(False)  # keep intermediates/ when the run completes


LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                    "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale")
IMAGE_UPSCALERS = ("Lanczos", "Nearest")  # built in; any other name is a model file


def _upscaler(v: str) -> str | None:
    """Any name: built-in, latent (hires fix only) or a model file, found by run.prepare."""
    if v == "None":  # the WebUI's: no upscale at all (Extras), a plain resize (hires fix)
        return ("'None' does not upscale: give Lanczos for a plain resize; for faces alone, "
                "a face_restore step")
    return None if v.strip() else "must name an upscaler (Lanczos, Nearest, or a model file)"


def _image_upscaler(v: str) -> str | None:
    if v in LATENT_UPSCALERS:
        return (f"{v!r} upscales latents, which only hires fix has: give Lanczos, Nearest "
                "or an upscaler model (e.g. R-ESRGAN 4x+)")
    return _upscaler(v)


def _second_upscaler(v: str) -> str | None:
    return None if v == "None" else _image_upscaler(v)
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")
INPAINT_AREAS = ("whole_picture", "only_masked")


CONTROL_MODES = ("balanced", "my_prompt", "controlnet")
CONTROL_RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")


def _preprocessor_word(v: Any) -> Any:
    """The issue's words (brightness, tile, scribble) as the extension's module names."""
    if isinstance(v, list | tuple):
        return [_preprocessor_word(x) for x in v]
    return preprocessor_names.canonical(v) if isinstance(v, str) else v


@dataclass(frozen=True)
class ControlNetUnit:
    """One unit of the sd-webui-controlnet extension (several units: Multi-ControlNet).

    control_mode: balanced ("Balanced"), my_prompt ("My prompt is more important"),
    controlnet ("ControlNet is more important"). low_threshold / high_threshold are the
    extension's Threshold A / B; unset, the preprocessor's defaults (canny: 100 / 200).
    """

    model: Axis[str] = spec()  # a name under paths.models/ControlNet/ (or tiny's), or a path
    image: Axis[str] = spec()  # the picture the preprocessor reads
    preprocessor: Axis[str] = spec("none", preprocessor_names.check, _preprocessor_word)
    low_threshold: Axis[float] | None = spec(None)
    high_threshold: Axis[float] | None = spec(None)
    weight: Axis[float] = spec(1.0, _range(0, 2))
    guidance_start: Axis[float] = spec(0.0, _range(0, 1))
    guidance_end: Axis[float] = spec(1.0, _range(0, 1))
    control_mode: Axis[str] = spec("balanced", _one_of(CONTROL_MODES))
    resize_mode: Axis[str] = spec("crop_and_resize", _one_of(CONTROL_RESIZE_MODES))
    processor_res: Axis[int] = spec(512, _range(64, 2048))
    pixel_perfect: Axis[bool] = spec(False)  # processor_res from the image and stage size


def _denoise(v: float) -> str | None:
    return _range(0, 1)(v)


def _post_size(v: int) -> str | None:
    return None if v == 0 else _size(v)


@dataclass(frozen=True)
class Sampling:
    """The sampling keys every post-step may set; unset (null) takes the image's own."""

    sampler: Axis[str] | None = spec(None, sampler_names.check_sampler)
    schedule_type: Axis[str] | None = spec(None, sampler_names.check_schedule_type)
    cfg_scale: Axis[float] | None = spec(None, _range(0, 100))
    prompt: Axis[str] | None = spec(None)
    negative_prompt: Axis[str] | None = spec(None)
    seed: Axis[int] | None = spec(None, _range(0, MAX_SEED))  # counts up like the image's
    controlnet: tuple[ControlNetUnit, ...] | None = spec(None)  # unset: the job's units


@dataclass(frozen=True)
class HiresFix(Sampling):
    """The WebUI's hires fix: upscale the first pass, then img2img it at the new size."""

    scale: Axis[float] = spec(2.0, _range(1, 16))
    resize_x: Axis[int] = spec(0, _range(0))  # 0 = from scale
    resize_y: Axis[int] = spec(0, _range(0))
    upscaler: Axis[str] = spec("Latent", _upscaler)  # latent, built in or a model file
    steps: Axis[int] = spec(0, _range(0, 1000))  # 0 = the first pass's steps
    denoise: Axis[float] = spec(0.7, _denoise)
    checkpoint: Axis[str] | None = spec(None)  # another model for the second pass


@dataclass(frozen=True)
class Img2Img(Sampling):
    """img2img of the previous image (or init_image) at width x height."""

    denoise: Axis[float] = spec(0.75, _denoise)
    resize_mode: Axis[str] = spec("just_resize", _one_of(RESIZE_MODES))
    width: Axis[int] = spec(0, _post_size)  # 0 = the input's size
    height: Axis[int] = spec(0, _post_size)
    steps: Axis[int] = spec(0, _range(0, 1000))  # 0 = the job's steps


@dataclass(frozen=True)
class Inpaint(Sampling):
    """An inpaint pass: repaint where the mask is white, keep the rest byte for byte."""

    mask: Axis[str] | None = spec(None)  # required: white repaints (RGBA: opaque)
    invert_mask: Axis[bool] = spec(False)
    mask_blur: Axis[int] = spec(4, _range(0, 64))
    masked_content: Axis[str] = spec("original", _one_of(MASKED_CONTENT))
    inpaint_area: Axis[str] = spec("whole_picture", _one_of(INPAINT_AREAS))
    only_masked_padding: Axis[int] = spec(32, _range(0, 256))
    denoise: Axis[float] = spec(0.75, _denoise)
    width: Axis[int] = spec(0, _post_size)  # processing size; 0 = the input's size
    height: Axis[int] = spec(0, _post_size)
    steps: Axis[int] = spec(0, _range(0, 1000))  # 0 = the job's steps


@dataclass(frozen=True)
class SdUpscale(Sampling):
    """The WebUI's SD upscale script: upscale by ``scale``, then img2img the picture in tiles
    of width x height overlapping by ``tile_overlap``, blended back across the overlaps."""

    scale: Axis[float] = spec(2.0, _range(1, 16))
    upscaler: Axis[str] = spec("Lanczos", _image_upscaler)  # built in or a model file
    tile_overlap: Axis[int] = spec(64, _range(0, 256))
    denoise: Axis[float] = spec(0.4, _denoise)  # the seed's advice; the WebUI takes img2img's
    width: Axis[int] = spec(0, _post_size)  # the tile size; 0 = params.width / height
    height: Axis[int] = spec(0, _post_size)
    steps: Axis[int] = spec(0, _range(0, 1000))  # 0 = the job's steps


@dataclass(frozen=True)
class Upscale:
    """The WebUI's Extras tab: upscale without diffusion, by ``scale`` or to resize_x x
    resize_y (cropped to fit), a second upscaler blended in by its visibility."""

    scale: Axis[float] = spec(2.0, _range(1, 16))
    resize_x: Axis[int] = spec(0, _range(0))  # with resize_y: upscale to this size instead
    resize_y: Axis[int] = spec(0, _range(0))
    upscaler: Axis[str] = spec("Lanczos", _image_upscaler)  # built in or a model file
    upscaler_2: Axis[str] = spec("None", _second_upscaler)  # None: no second upscaler
    upscaler_2_visibility: Axis[float] = spec(0.0, _range(0, 1))
    # the Extras' face restorers, after the upscale in its order (GFPGAN, then CodeFormer)
    gfpgan_visibility: Axis[float] = spec(0.0, _range(0, 1))  # 0 = off
    codeformer_visibility: Axis[float] = spec(0.0, _range(0, 1))  # 0 = off
    codeformer_weight: Axis[float] = spec(0.0, _range(0, 1))  # 0 = strongest effect


@dataclass(frozen=True)
class FaceRestore:
    """The WebUI's "Restore faces": each face found is aligned, restored at 512x512 by the
    model and pasted back, the result blended over the picture by ``visibility``."""

    model: Axis[str] = spec("CodeFormer")  # GFPGAN, CodeFormer, or a file stem or path
    visibility: Axis[float] = spec(1.0, _range(0, 1))
    weight: Axis[float] = spec(0.5, _range(0, 1))  # CodeFormer's fidelity weight (its opts')


@dataclass(frozen=True)
class PostStep:
    """One step of ``post``: a mapping with exactly one of these keys."""

    hires_fix: HiresFix | None = spec(None)
    img2img: Img2Img | None = spec(None)
    inpaint: Inpaint | None = spec(None)
    sd_upscale: SdUpscale | None = spec(None)
    upscale: Upscale | None = spec(None)
    face_restore: FaceRestore | None = spec(None)

    @property
    def kind(self) -> str:
        return next(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    @property
    def step(self) -> Sampling | Upscale | FaceRestore:
        return getattr(self, self.kind)


@dataclass(frozen=True)
class Grid:
    """The X/Y/Z plot sheets written into grids/ (sdbatch/reports/grids.py): an axis of the
    job for the columns (x), the rows (y) and the sheets (z), by short name or dotted key
    (a zip group by any member, `batch` for the images of a cell); unset: the two longest
    axes, the others as separate sheets. Presentation only: no pixel of an image depends
    on it, so a resume may change it."""

    x: str | None = spec(None)
    y: str | None = spec(None)
    z: str | None = spec(None)
    max_megapixels: float = spec(16.0, _range(0.25, 1000))  # a sheet's pixel budget


@dataclass(frozen=True)
class Job:
    job: JobInfo = spec(default_factory=JobInfo)
    prompt: Axis[str] = spec("")
    negative_prompt: Axis[str] = spec("")
    prompt_file: str | None = spec(None)  # a recipe per line, like the WebUI's script
    init_image: Axis[str] | None = spec(None)  # start from this picture instead of txt2img
    post: tuple[PostStep, ...] = spec(())  # steps run in order, each on the previous image
    controlnet: tuple[ControlNetUnit, ...] = spec(())  # units of every diffusion stage
    styles: tuple[str, ...] = spec(())  # names from paths.styles, applied to every prompt
    dynamic_prompts: DynamicPrompts = spec(default_factory=DynamicPrompts)
    params: Params = spec(default_factory=Params)
    zip: tuple[tuple[str, ...], ...] = spec(())
    paths: Paths = spec(default_factory=Paths)
    model: Model = spec(default_factory=Model)
    executor: Executor = spec(default_factory=Executor)
    run: Run = spec(default_factory=Run)
    grid: Grid = spec(default_factory=Grid)


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.key} ({self.source}): {self.message}"


class JobError(Exception):
    """Every problem found in a job, reported together before any work starts."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"the job has {len(problems)} problem(s); nothing was run:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


Origin = Callable[[str], str]


def axes() -> dict[str, str]:
    """Every key that may be a grid axis, short name -> dotted key, in matrix order
    (outermost first). zip groups name axes by either form: [prompt, seed]."""
    out = {f.name: f"model.{f.name}" for f in dataclasses.fields(Model)
           if _axis_type(_hints(Model)[f.name])}
    out |= {f.name: f.name for f in dataclasses.fields(Job) if _axis_type(_hints(Job)[f.name])}
    out |= {f.name: f"params.{f.name}" for f in dataclasses.fields(Params)
            if _axis_type(_hints(Params)[f.name])}
    return out


def post_axes(job: Job) -> list[str]:
    """The axis keys of the job's post-steps, ``post.N.kind.key``, in the order written
    (innermost axes of the matrix, after the table's)."""
    out = []
    for i, step in enumerate(job.post):
        kind = step.kind
        hints = _hints(type(step.step))
        out += [f"post.{i}.{kind}.{f.name}" for f in dataclasses.fields(step.step)
                if _axis_type(hints[f.name])]
        out += unit_axes(getattr(step.step, "controlnet", None) or (), f"post.{i}.{kind}.")
    return out


def unit_axes(units: tuple[ControlNetUnit, ...], prefix: str = "") -> list[str]:
    """The axis keys of ControlNet units, ``[prefix]controlnet.N.key``, in the order written."""
    return [f"{prefix}controlnet.{n}.{f.name}" for n in range(len(units))
            for f in dataclasses.fields(ControlNetUnit)]


def all_axes(job: Job) -> dict[str, str]:
    """Every axis of this job: the table's (short name -> dotted key), its ControlNet
    units' and its post-steps'."""
    return axes() | {key: key for key in unit_axes(job.controlnet) + post_axes(job)}


def knows(key: str) -> bool:
    """Whether a dotted key is one of the schema's (or lies inside a list or mapping value of
    one), so that a command-line override of anything else is reported like a file's key."""
    cls: Any = Job
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return True
        hints = _hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return True


def get(job: Job, key: str) -> Any:
    """The value at a dotted key."""
    obj: Any = job
    for part in key.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def validate(raw: Mapping[str, Any], origin: Origin = lambda key: "the job") -> Job:
    """Turn a composed config into a typed Job, or raise JobError listing every problem."""
    problems: list[Problem] = []
    job = _build(Job, raw, "", problems, origin)
    if not problems:
        problems += (_check_post(job, origin) + _check_controlnet(job, origin)
                     + _check_executor(job.executor, origin))
    if not problems:
        full = {v: v for v in all_axes(job).values()} | all_axes(job)
        job = dataclasses.replace(job, zip=tuple(tuple(full.get(n, n) for n in group)
                                                 for group in job.zip))
        problems += (_check_zip(job, origin) + _check_sampler_pairs(job, origin)
                     + grid_problems(job, origin))
    if problems:
        raise JobError(problems)
    return job


def _check_post(job: Job, origin: Origin) -> list[Problem]:
    problems = []
    if job.init_image is not None and not job.post:
        problems.append(Problem("init_image", "an init image needs a post-step to run on it "
                                "(e.g. post: [{img2img: {denoise: 0.5}}]); without one there "
                                "is nothing to do", origin("init_image")))
    for i, step in enumerate(job.post):
        key = f"post[{i}]"
        given = [f.name for f in dataclasses.fields(step) if getattr(step, f.name) is not None]
        if len(given) != 1:
            names = ", ".join(f.name for f in dataclasses.fields(PostStep))
            problems.append(Problem(key, f"a post-step is one of {names}, got "
                                    f"{', '.join(given) or 'none'}: write one per list item",
                                    origin(key)))
            continue
        if step.kind in ("upscale", "hires_fix"):
            problems += _resize_problems(step, key, origin)
        if step.kind == "upscale":
            u = step.upscale
            if any(_values(u.resize_x)) != any(_values(u.resize_y)):
                problems.append(Problem(f"{key}.upscale.resize_x", "upscale to a size needs "
                                        "both resize_x and resize_y (or neither: then scale)",
                                        origin(f"{key}.upscale.resize_x")))
            continue
        if step.kind == "face_restore":
            continue
        for name in ("prompt", "negative_prompt"):
            for text in _values(getattr(step.step, name)):
                if text and re.search(r"<(lora|lyco|hypernet):", text):
                    problems.append(Problem(
                        f"{key}.{step.kind}.{name}", "a post-step's prompt cannot switch "
                        "networks (its image's LoRAs and hypernetworks apply): move the tag "
                        "to the image's prompt or model.loras",
                        origin(f"{key}.{step.kind}.{name}")))
        if step.kind == "inpaint" and step.inpaint.mask is None:
            problems.append(Problem(f"{key}.inpaint.mask", "is required: the mask image "
                                    "(white repaints)", origin(f"{key}.inpaint.mask")))
    return problems


def _check_executor(executor: Executor, origin: Origin) -> list[Problem]:
    """A key another executor reads is a mistake (executor=slurm forgotten), not a no-op."""
    default = Executor()
    problems = []
    for name, keys in EXECUTOR_KEYS.items():
        for key in keys:
            if name != executor.name and getattr(executor, key) != getattr(default, key):
                problems.append(Problem(
                    f"executor.{key}", f"is read by executor={name}, and this job runs "
                    f"executor={executor.name}: add executor={name} or remove the key",
                    origin(f"executor.{key}")))
    if executor.name == "multi" and executor.device != default.device:
        problems.append(Problem("executor.device", "executor=multi runs one worker per "
                                "device of executor.devices: give "
                                f"'executor.devices=[{executor.device}]' instead",
                                origin("executor.device")))
    return problems


def _check_controlnet(job: Job, origin: Origin) -> list[Problem]:
    """Each unit's guidance window and thresholds, for every combination of its values."""
    problems = []
    groups = [("controlnet", job.controlnet)] + [
        (f"post[{i}].{step.kind}.controlnet", getattr(step.step, "controlnet", None) or ())
        for i, step in enumerate(job.post)]
    for where, units in groups:
        for n, unit in enumerate(units):
            key = f"{where}[{n}]"
            if any(s > e for s in _values(unit.guidance_start) for e in _values(unit.guidance_end)):
                problems.append(Problem(f"{key}.guidance_start", "must not be after "
                                        "guidance_end (both are fractions of the steps)",
                                        origin(f"{key}.guidance_start")))
            for name in _values(unit.preprocessor):
                for low in _values(unit.low_threshold):
                    for high in _values(unit.high_threshold):
                        for msg in preprocessor_names.threshold_problems(name, low, high):
                            problems.append(Problem(key, msg, origin(key)))
    return list({str(p): p for p in problems}.values())


def _resize_problems(step: PostStep, key: str, origin: Origin) -> list[Problem]:
    """A target size given in pixels must sit on the VAE's 8-pixel grid."""
    problems = []
    for name in ("resize_x", "resize_y"):
        for v in _values(getattr(step.step, name)):
            if v and (msg := _size(v)):
                where = f"{key}.{step.kind}.{name}"
                problems.append(Problem(where, msg, origin(where)))
    return problems


def _check_zip(job: Job, origin: Origin) -> list[Problem]:
    problems = []
    known = all_axes(job)
    dotted = {v: v for v in known.values()} | known
    seen: dict[str, int] = {}
    for g, group in enumerate(job.zip):
        key = f"zip[{g}]"
        lengths = {}
        for short in group:
            if short not in dotted:
                close = difflib.get_close_matches(short, list(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(Problem(key, f"'{short}' is not a grid axis{hint} "
                                        f"(axes: {', '.join(known)})", origin("zip")))
                continue
            name = dotted[short]
            if name in seen:
                problems.append(Problem(key, f"'{name}' is already in zip[{seen[name]}]; an "
                                        "axis can be in one zip group only", origin("zip")))
            seen[name] = g
            value = get(job, name)
            if not isinstance(value, tuple):
                problems.append(Problem(key, f"'{name}' is a single value; zip pairs lists: "
                                        f"give {name} as a list", origin(name)))
                continue
            lengths[name] = len(value)
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            problems.append(Problem(key, f"zipped lists must have the same length: {desc}",
                                    origin("zip")))
    return problems


GRID_BATCH = "batch"  # the grid axis of a cell's images (batch_count x batch_size)


def grid_axes(job: Job) -> dict[str, tuple[str, ...]]:
    """The axes a grid may show, each name it answers to (short name or dotted key) ->
    its keys (a zip group's members); `batch` when a cell has several images. A prompt
    counts when a prompt file or dynamic prompt syntax may make it a list."""
    dotted = {v: v for v in all_axes(job).values()} | all_axes(job)
    group = {k: g for g in job.zip for k in g}
    may_expand = {k for k in ("prompt", "negative_prompt")
                  if job.prompt_file or (job.dynamic_prompts.mode != "off" and any(
                      "{" in t or "__" in t for t in _values(get(job, k))))}
    out: dict[str, tuple[str, ...]] = {}
    for name, key in dotted.items():
        if isinstance(get(job, key), tuple) or key in may_expand:
            out[name] = group.get(key, (key,))
    if job.params.batch_count * job.params.batch_size > 1:
        out[GRID_BATCH] = (GRID_BATCH,)
    return out


def grid_problems(job: Job, origin: Origin) -> list[Problem]:
    """Each named grid axis is an axis of this job, and no two name the same one."""
    problems = []
    axes = grid_axes(job)
    shown = ", ".join(dict.fromkeys(k for k in axes if "." not in k or k.startswith("post.")
                                    or k.startswith("controlnet."))) or "none"
    taken: dict[tuple[str, ...], str] = {}
    for which in ("x", "y", "z"):
        name = getattr(job.grid, which)
        if name is None:
            continue
        key = f"grid.{which}"
        if name not in axes:
            close = difflib.get_close_matches(name, list(axes), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(Problem(key, f"'{name}' is not an axis of this job (a key given as "
                                    f"a list){hint}; its axes: {shown}", origin(key)))
        elif axes[name] in taken:
            problems.append(Problem(key, f"'{name}' is the axis grid.{taken[axes[name]]} "
                                    "already shows; name another", origin(key)))
        else:
            taken[axes[name]] = which
    return problems


def _check_sampler_pairs(job: Job, origin: Origin) -> list[Problem]:
    """Each sampler with each schedule type of the grid (zipped pairs are a subset), the
    post-steps' too."""
    problems = []
    for i, step in enumerate(job.post):
        s = step.step
        if not isinstance(s, Sampling) or s.schedule_type is None:
            continue  # a sampler alone takes the image's schedule where it can (matrix)
        key = f"post[{i}].{step.kind}.sampler"
        names = _values(s.sampler) if s.sampler is not None else tuple(
            _base_name(n) for n in _values(job.params.sampler))  # its own schedule replaces
        for name, schedule in _pairs(job, names, _values(s.schedule_type),  # the job's
                                     f"post.{i}.{step.kind}"):
            try:
                sampler_names.split(name, schedule)
            except sampler_names.SamplerError as e:
                problems.append(Problem(key, str(e), origin(key)))
    if any(e is not None for e in _values(job.params.eta)):
        others = [s for s in _values(job.params.sampler) if sampler_names.split(s)[0] != "DDIM"]
        if others:
            problems.append(Problem("params.eta", f"eta applies to DDIM only (diffusers' other "
                                    f"samplers take none), not to {', '.join(others)}",
                                    origin("params.eta")))
    for name, schedule in _pairs(job, _values(job.params.sampler),
                                 _values(job.params.schedule_type), "params"):
        try:
            sampler_names.split(name, schedule)
        except sampler_names.SamplerError as e:
            problems.append(Problem("params.sampler", str(e), origin("params.sampler")))
    return problems


def _base_name(name: str) -> str:
    """A sampler name without the schedule type its old combined form carries."""
    try:
        return sampler_names.split(name)[0]
    except sampler_names.SamplerError:
        return name  # reported where the job's own sampler is checked


def _pairs(job: Job, samplers: tuple, schedules: tuple, prefix: str) -> list[tuple]:
    """The (sampler, schedule type) pairs the matrix makes: zipped lists pair up, others
    cross."""
    keys = (f"{prefix}.sampler", f"{prefix}.schedule_type")
    dotted = {**{v: v for v in all_axes(job).values()}, **all_axes(job)}
    if any({dotted.get(k) for k in group} >= set(keys) for group in job.zip) \
            and len(samplers) == len(schedules):
        return list(dict.fromkeys(zip(samplers, schedules, strict=True)))
    return [(n, s) for n in dict.fromkeys(samplers) for s in dict.fromkeys(schedules)]


def _values(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _axis_type(tp: Any) -> Any:
    """The element type if ``tp`` is Axis[X] (or Axis[X] | None), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        if len(args) == 2 and typing.get_origin(args[1]) is tuple and \
                typing.get_args(args[1]) == (args[0], Ellipsis):
            return args[0]
    return None


# the WebUI's (and diffusers') names of keys sdbatch names otherwise
OTHER_NAMES = {"denoising_strength": "denoise", "n_iter": "batch_count", "cfg": "cfg_scale",
               "guidance_scale": "cfg_scale", "num_inference_steps": "steps",
               "sampler_name": "sampler", "scheduler": "schedule_type",
               "hr_scale": "scale", "hr_upscaler": "upscaler", "hr_second_pass_steps": "steps",
               "inpainting_fill": "masked_content", "inpaint_full_res": "inpaint_area",
               "inpaint_full_res_padding": "only_masked_padding",
               "inpainting_mask_invert": "invert_mask"}


def _unknown_key_hint(cls: type, key: str, names: list[str]) -> str:
    """"did you mean ...? " for an unknown key: its sdbatch name where the WebUI's was
    given, a params key given at the top level, denoise given to params, or the nearest."""
    ours = OTHER_NAMES.get(key, key)
    params = [f.name for f in dataclasses.fields(Params)]
    if ours in names and ours != key:
        return f"did you mean '{ours}'? ({key} is called {ours} here) "
    if cls is Job and ours in params:
        return f"did you mean 'params.{ours}'? "
    if cls is Params and ours == "denoise":
        return ("denoise belongs to a post-step that samples again: post: [{img2img: "
                "{denoise: 0.5}}] (or hires_fix, inpaint, sd_upscale); ")
    close = difflib.get_close_matches(key, names, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _build(cls: type, raw: Any, prefix: str, problems: list[Problem], origin: Origin) -> Any:
    if not isinstance(raw, Mapping):
        key = prefix.rstrip(".") or "<root>"
        problems.append(Problem(key, f"must be a mapping of keys, got {raw!r}", origin(key)))
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            hint = _unknown_key_hint(cls, str(key), names)
            problems.append(Problem(f"{prefix}{key}", f"unknown key; {hint}valid keys here: "
                                    f"{', '.join(names)}", origin(f"{prefix}{key}")))
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}{f.name}"
        before = len(problems)
        read = f.metadata.get("read")
        value = _coerce(read(raw[f.name]) if read else raw[f.name], hints[f.name], key,
                        problems, origin)
        sweep = f.metadata.get("not_an_axis")
        if sweep and len(problems) > before and isinstance(raw[f.name], list | tuple):
            problems[before] = dataclasses.replace(
                problems[before], message=f"{problems[before].message}; {sweep}")
        check = f.metadata.get("check")
        if check and len(problems) == before:
            for item in (value if isinstance(value, tuple) and _axis_type(hints[f.name])
                         else (value,)):
                if item is not None and (msg := check(item)):
                    problems.append(Problem(key, msg, origin(key)))
                    break
        if len(problems) == before:
            values[f.name] = value
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in raw:
            key = f"{prefix}{name}"
            problems.append(Problem(key, "is required", origin(prefix.rstrip(".") or key)))
    if any(name not in values for name in required):  # missing, or refused above
        return None
    return cls(**values)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(v: Any, tp: Any, key: str, problems: list[Problem], origin: Origin) -> Any:
    def bad(expected: str) -> None:
        problems.append(Problem(key, f"must be {expected}, got {v!r}", origin(key)))

    if dataclasses.is_dataclass(tp):
        return _build(tp, v, f"{key}.", problems, origin)
    element = _axis_type(tp)
    if element is not None and v is None and type(None) in typing.get_args(tp):
        return None
    if element is not None:
        if v is None and type(None) in typing.get_args(tp):
            return None
        if isinstance(v, list | tuple):
            if not v:
                bad(f"{_TYPE_NAMES[element]} or a non-empty list of them")
                return None
            return tuple(_coerce(x, element, f"{key}[{i}]", problems, origin)
                         for i, x in enumerate(v))
        return _coerce(v, element, key, problems, origin)
    if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return None if v is None else _coerce(v, inner, key, problems, origin)
    if typing.get_origin(tp) is tuple:
        if not isinstance(v, list | tuple):
            bad("a list")
            return ()
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(x, inner, f"{key}[{i}]", problems, origin) for i, x in enumerate(v))
    if tp is float and isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, tp) and not (tp is int and isinstance(v, bool)):
        return v
    bad(_TYPE_NAMES.get(tp, tp.__name__))
    return None


def to_dict(job: Job) -> dict[str, Any]:
    """The job as plain data (tuples become lists), for run folders and PNG recipes."""

    def walk(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple | list):
            return [walk(i) for i in obj]
        return obj

    return walk(job)
