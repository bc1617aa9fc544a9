"""Stack specs -> loaded pipelines, through a least-recently-used cache.

A StackSpec names every file of a stack (found up front by sdbatch.model_specs) and has an
identity (content hashes of its files, device, dtype) that goes into every content key.
This module knows nothing of jobs: it loads what a spec says.
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from sdbatch.models import hashing, names, tiny
from sdbatch.models.embeddings import load_embedding
from sdbatch.models.single_file import load_single_file, load_vae

EMBEDDED = {"tiny": tiny.model_folder}
# executor keys that make a stack compute differently: each can move a pixel by a level
# (other kernels, fused ops, fused weights, other algorithms), so a stack's identity
# and record name those that are on, and a resume or reproduce follows them
SWITCHES = ("channels_last", "compile", "deterministic", "fuse_loras")


@dataclass(frozen=True)
class StackSpec:
    """What a stack is made of: files resolved, nothing loaded."""

    name: str  # the WebUI's "Model": the checkpoint's stem
    path: Path
    dtype: str = "auto"
    family: str = "auto"
    vae: Path | None = None
    embeddings: tuple[Path, ...] = field(default=())
    allow_pickle: bool = False
    config: Path | None = None
    device: str = "auto"  # executor.device: where it will run, which picks the dtype too
    switches: tuple[str, ...] = ()  # the SWITCHES that are on, in SWITCHES' order

    @cached_property
    def model_hash(self) -> str:
        return hashing.model_hash(self.path)

    @cached_property
    def vae_hash(self) -> str | None:
        return hashing.model_hash(self.vae) if self.vae else None

    @property
    def torch_device(self) -> torch.device:
        return pick_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return pick_dtype(self.dtype, self.torch_device)

    @cached_property
    def embedding_hashes(self) -> dict[str, str]:
        """Each embedding's trigger (its file stem) -> the WebUI's "TI hashes" value."""
        from sdbatch.models.embeddings import ti_hash

        return {names.stem(e.name): ti_hash(e) for e in self.embeddings}

    @cached_property
    def record(self) -> dict[str, Any]:
        """What makes the stack's pixels: its files' hashes, the device type and dtype it
        computes in (kernels differ between devices and precisions), and the speed switches
        that are on (named only then, so stacks made before the switches keep their
        identity)."""
        return {"model": self.model_hash, "vae": self.vae_hash, "family": self.family,
                "embeddings": {e.name: hashing.sha256(e)[:12] for e in self.embeddings},
                "device": self.torch_device.type,
                "dtype": str(self.torch_dtype).removeprefix("torch.")} | (
                    {"switches": list(self.switches)} if self.switches else {})

    @cached_property
    def identity(self) -> str:
        r = self.record
        return ":".join([r["model"], r["vae"] or "-", r["family"], *r["embeddings"].values(),
                         r["device"], r["dtype"], *r.get("switches", ())])


@dataclass(frozen=True)
class NetworkFile:
    path: Path
    hash: str  # as the WebUI writes it: "Lora hashes" / hypernet hash; a ControlNet's AutoV2
    short: str = ""  # a ControlNet's old 8-digit hash, which the extension's infotext shows


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device) -> dict[str, Any]:
    """Where pixels are computed, as run.json and each recipe record it: the device type,
    its name (the GPU's, or the CPU architecture) and torch's thread count (CPU kernels sum
    in another order on another count)."""
    import platform

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.machine() or "unknown")
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads()}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def dtype_problem(name: str, device: torch.device) -> str | None:
    """Why ``model.dtype`` cannot run on ``device`` (bfloat16 on a GPU without it), or
    None. A GPU before Ampere only emulates bfloat16, many times slower than float16."""
    if name != "bfloat16" or device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None  # no GPU at all: the device is what is wrong, reported as such
        major, minor = torch.cuda.get_device_capability(device)  # this GPU's, not cuda:0's
        if major >= 8:
            return None
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                "has no bfloat16 arithmetic (it needs 8.0, Ampere or later); use "
                "model.dtype=float16 (or auto)")
    try:
        torch.zeros(1, dtype=torch.bfloat16, device=device)
    except (RuntimeError, TypeError) as e:
        return f"{device} cannot hold bfloat16 tensors ({e}); use model.dtype=float16 or auto"
    return None


def deterministic(on: bool) -> None:
    """executor.deterministic: torch's deterministic algorithms (an op without one raises,
    naming it), cuDNN's deterministic convolutions, no autotuning and no TF32, and cuBLAS
    on a fixed workspace (CUBLAS_WORKSPACE_CONFIG, set before the first cuBLAS call when
    the stack loads first in the process). Off gives torch's defaults back. Process-wide,
    as torch's flags are."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = not on
    torch.backends.cuda.matmul.allow_tf32 = False


def sdpa_attention(model: torch.nn.Module) -> None:
    """Make every attention of a diffusers model run torch's scaled_dot_product_attention
    (diffusers' AttnProcessor2_0, its default on torch 2): a model whose config or
    loader picked the classic processor (softmax of the full score matrix) gets SDPA."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(model, "attn_processors", None)
    if processors and any(type(p) is AttnProcessor for p in processors.values()):
        model.set_attn_processor({name: AttnProcessor2_0() if type(p) is AttnProcessor else p
                                  for name, p in processors.items()})


def speed_up(pipe, switches: tuple[str, ...]) -> None:
    """The speed settings of a loaded pipeline: SDPA attention always; with the switches,
    channels_last UNet and VAE, and a compiled UNet (torch.compile in place, so every part
    of sdbatch keeps seeing the same module; compiled on its first batch, again for a new
    shape or a new set of LoRA scales)."""
    for model in (pipe.unet, pipe.vae):
        sdpa_attention(model)
        if "channels_last" in switches:
            model.to(memory_format=torch.channels_last)
    if "compile" in switches:
        pipe.unet.compile()


def quiet_libraries() -> None:
    """diffusers' and transformers' own loading bars and notices would drown sdbatch's."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@dataclass
class Stack:
    spec: StackSpec
    pipe: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    triggers: dict[str, str] = field(default_factory=dict)  # embedding token -> TI hash
    controlnets: dict[Path, Any] = field(default_factory=dict)  # loaded once per stack

    def controlnet(self, path: Path):
        """The ControlNet at ``path`` for this stack's UNet, loaded on first use and shared
        by every batch after (a unit's weight or window never reloads it)."""
        if path not in self.controlnets:
            from sdbatch.models import controlnet

            model = controlnet.load(path, self.pipe.unet.config, self.dtype,
                                    self.spec.allow_pickle)
            sdpa_attention(model)
            if "channels_last" in self.spec.switches:
                model.to(memory_format=torch.channels_last)
            self.controlnets[path] = model.to(self.device)
        return self.controlnets[path]

    def use_networks(self, loras: list[tuple[Path, float | tuple[float, float]]],
                     hypernetworks: list[tuple[Path, float]]) -> None:
        """Set the batch's LoRA and hypernetwork weights (a LoRA's: one number, or (text
        encoder, UNet)); files load once, the model never reloads. With fuse_loras the LoRA
        weights are fused into the model's own for as long as they stay the same (see
        LoraSet.apply)."""
        from sdbatch.models.hypernetwork import Hypernetworks
        from sdbatch.models.lora import LoraSet

        LoraSet(self.pipe).apply(loras, fuse="fuse_loras" in self.spec.switches)
        Hypernetworks(self.pipe).apply(hypernetworks)

    def check_loras(self, paths: list[Path]) -> None:
        """Refuse a LoRA that does not fit this model, before any image is rendered."""
        from sdbatch.models.lora import check_lora

        for path in paths:
            check_lora(path, self.pipe)

    def nbytes(self) -> int:
        models = [m for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                  if (m := getattr(self.pipe, name, None)) is not None]
        return sum(p.numel() * p.element_size()
                   for m in [*models, *self.controlnets.values()] for p in m.parameters())


def load(spec: StackSpec, device: torch.device) -> Stack:
    """Load a stack fully offline, in its dtype, on the device: a diffusers folder as it
    is, a single file through its family's shipped configs, then the VAE override."""
    quiet_libraries()
    from diffusers import DiffusionPipeline

    dtype = pick_dtype(spec.dtype, device)
    deterministic("deterministic" in spec.switches)  # before the first cuBLAS call
    if spec.path.is_dir():
        pipe = DiffusionPipeline.from_pretrained(spec.path, dtype=dtype, local_files_only=True,
                                                 safety_checker=None,
                                                 requires_safety_checker=False)
    else:
        pipe = load_single_file(spec.path, spec.family, dtype, spec.allow_pickle, spec.config)
    if spec.vae is not None:
        family = spec.family if spec.family != "auto" else (
            "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15")
        pipe.vae = load_vae(spec.vae, family, dtype, spec.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    speed_up(pipe, spec.switches)
    stack = Stack(spec, pipe, dict(pipe.scheduler.config), device, dtype)
    for path in spec.embeddings:
        embedding = load_embedding(pipe, path)
        stack.triggers[embedding.token] = embedding.hash
    return stack


class StackLoadError(RuntimeError):
    """A stack that cannot load stops the run: that is a broken model, not a broken image."""


class StackCache:
    """Loaded stacks of a run (of a worker): the one in use, and up to budget_gb of others
    kept for later (least recently used evicted first).

    A stack no longer kept is released before the next one loads, so a checkpoint axis peaks
    at one stack plus the budget, not two stacks. loads and evictions are counted.
    """

    def __init__(self, device: torch.device, budget_gb: float = 0.0, loader=None):
        self.device = device
        self.budget = budget_gb * 2**30
        self.loader = loader
        self.stacks: OrderedDict[str, Stack] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def get(self, spec: StackSpec) -> Stack:
        """The spec's stack, loaded if needed; the caller drops its previous stack first."""
        if spec.identity in self.stacks:
            self.stacks.move_to_end(spec.identity)
            return self.stacks[spec.identity]
        # every stack held now will be one "beyond the one in use": fit them to the budget
        evicted = self.evictions
        while self.stacks and sum(s.nbytes() for s in self.stacks.values()) > self.budget:
            self.stacks.popitem(last=False)
            self.evictions += 1
        if self.evictions > evicted:
            gc.collect()  # pipelines hold reference cycles: free the evicted weights now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            stack = (self.loader or load)(spec, self.device)
        except Exception as e:
            raise StackLoadError(f"cannot load {spec.path}: {e}") from e
        self.loads += 1
        self.stacks[spec.identity] = stack
        return stack
