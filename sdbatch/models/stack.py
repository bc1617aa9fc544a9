"""A job's model section -> resolved stack specs (checked up front) -> loaded pipelines.

Resolving finds every file (names as in the WebUI), so a missing one fails before any work,
and gives each stack an identity (content hashes of its files) that goes into every content
key. Loading happens later, once per stack, through a least-recently-used cache.
"""

from __future__ import annotations

import dataclasses
import gc
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from sdbatch.models import families, hashing, hub, names, tiny
from sdbatch.models.embeddings import load_embedding
from sdbatch.models.single_file import ModelFileError, load_single_file, load_vae
from sdbatch.prompts.parser import extract_extra_networks
from sdbatch.schema import Job, Model, Paths, Problem

EMBEDDED = {"tiny": tiny.model_folder}


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
    def record(self) -> dict[str, Any]:
        """What makes the stack's pixels: its files' hashes, and the device type and dtype
        it computes in (kernels differ between devices and precisions)."""
        return {"model": self.model_hash, "vae": self.vae_hash, "family": self.family,
                "embeddings": {e.name: hashing.sha256(e)[:12] for e in self.embeddings},
                "device": self.torch_device.type,
                "dtype": str(self.torch_dtype).removeprefix("torch.")}

    @cached_property
    def identity(self) -> str:
        r = self.record
        return ":".join([r["model"], r["vae"] or "-", r["family"], *r["embeddings"].values(),
                         r["device"], r["dtype"]])


def _models_dir(paths: Paths) -> Path | None:
    return Path(paths.models).expanduser() if paths.models else None


def resolve(model: Model, paths: Paths, checkpoint: str, origin=lambda key: "the job",
            device: str = "auto") -> tuple[StackSpec | None, list[Problem]]:
    """The spec for one checkpoint of a job's model section, to run on ``device`` (the
    executor's), or the problems that stop it."""
    problems: list[Problem] = []
    models = _models_dir(paths)
    if models is not None and not models.is_dir():
        problems.append(Problem("paths.models", f"no such folder: {models}; give your A1111 "
                                "models folder (with Stable-diffusion/, Lora/, ...)",
                                origin("paths.models")))
        models = None

    roots = [models, tiny.family_models()] if checkpoint in EMBEDDED else [models]

    def find(kind: str, name: str, key: str) -> Path | None:
        try:
            return _find_in(roots, kind, name)
        except names.NameNotFound as e:
            problems.append(Problem(key, str(e), origin(key)))
            return None

    if checkpoint in EMBEDDED:
        path: Path | None = EMBEDDED[checkpoint]()
    elif hub.is_hub_id(checkpoint) and not _found(checkpoint, models):
        try:
            path = hub.fetch(checkpoint)
        except hub.HubError as e:
            problems.append(Problem("model.checkpoint", str(e), origin("model.checkpoint")))
            path = None
    else:
        path = find("checkpoint", checkpoint, "model.checkpoint")
    vae = find("vae", model.vae, "model.vae") if model.vae else None
    config = Path(model.config).expanduser() if model.config else None
    if config is not None and not (config / "model_index.json").is_file():
        problems.append(Problem("model.config", f"{config} is not a diffusers folder (no "
                                "model_index.json)", origin("model.config")))
    embeddings = tuple(find("embedding", e, "model.embeddings") for e in model.embeddings)
    if problems or path is None:
        return None, problems
    family = model.family
    if path.is_file() and config is None:
        try:
            detected = families.detect_family(path)
            if family == "auto":
                family = detected
            else:
                families.check_compatible(family, detected, str(path))
        except ModelFileError as e:
            return None, [Problem("model.checkpoint", str(e), origin("model.checkpoint"))]
    name = (checkpoint if checkpoint in EMBEDDED or hub.is_hub_id(checkpoint)
            else names.stem(path.name))
    return StackSpec(name, path, model.dtype, family, vae, embeddings, model.allow_pickle,
                     config, device), []


@dataclass(frozen=True)
class NetworkFile:
    path: Path
    hash: str  # as the WebUI writes it: "Lora hashes" / hypernet hash


def resolve_networks(job: Job, renders, origin=lambda key: "the job"
                     ) -> tuple[dict[tuple[str, str], NetworkFile], list[Problem]]:
    """Every LoRA and hypernetwork the renders use -> its file, found before any work."""
    from sdbatch.models.hypernetwork import hypernetwork_hash
    from sdbatch.models.lora import lora_hash

    roots = _roots(job)
    stack_names = {("lora", n.name) for n in job.model.loras} | \
        {("hypernet", n.name) for n in job.model.hypernetworks}
    files: dict[tuple[str, str], NetworkFile] = {}
    problems: list[Problem] = []
    wanted = dict.fromkeys([("lora", name) for r in renders for name, _ in r.loras] +
                           [("hypernet", name) for r in renders for name, _ in r.hypernetworks])
    for kind, name in wanted:
        key = ("model.loras" if kind == "lora" else "model.hypernetworks") \
            if (kind, name) in stack_names else "prompt"
        try:
            path = _find_in(roots, "lora" if kind == "lora" else "hypernetwork", name)
        except names.NameNotFound as e:
            problems.append(Problem(key, str(e), origin(key)))
            continue
        digest = lora_hash(path) if kind == "lora" else hypernetwork_hash(path)
        files[(kind, name)] = NetworkFile(path, digest)
    for text in dict.fromkeys(r.prompt for r in renders):
        for tag in extract_extra_networks(text)[1]:
            te, unet = tag.multipliers()
            if tag.kind in ("lora", "hypernet") and te != unet:
                problems.append(Problem("prompt", f"<{tag.kind}:{tag.name}:...> gives the text "
                                        f"encoder {te} and the UNet {unet}: sdbatch applies one "
                                        "weight to both; give one number", origin("prompt")))
    return files, problems


def with_embeddings(specs: dict[str, StackSpec | None], renders, job: Job
                    ) -> dict[str, StackSpec | None]:
    """Each checkpoint's spec holding exactly the embeddings its renders trigger (as the
    WebUI, every file under embeddings/ may; model.embeddings adds files from elsewhere):
    only those are loaded and hashed, and their hashes are part of the stack's identity, so
    the content keys of a resumed run follow them."""
    found = names.embeddings_in(_roots(job))
    out: dict[str, StackSpec | None] = {}
    for checkpoint, spec in specs.items():
        if spec is None:
            out[checkpoint] = None
            continue
        files = {**found, **{names.stem(p.name): p for p in spec.embeddings}}
        used = dict.fromkeys(n for r in renders if r.checkpoint == checkpoint
                             for n in r.embeddings)
        out[checkpoint] = dataclasses.replace(spec, embeddings=tuple(files[n] for n in used))
    return out


def _roots(job: Job) -> list[Path | None]:
    """Where names are looked up: paths.models, then the embedded family's own folder."""
    roots: list[Path | None] = [_models_dir(job.paths)]
    if any(c in EMBEDDED for c in (job.model.checkpoint if isinstance(job.model.checkpoint, tuple)
                                   else (job.model.checkpoint,))):
        roots.append(tiny.family_models())
    return roots


def _find_in(roots: list[Path | None], kind: str, name: str) -> Path:
    """The first root that has the name; else the error of the last folder searched (its
    nearest names are the most useful)."""
    errors = []
    for root in roots:
        try:
            return names.resolve(kind, name, root)
        except names.NameNotFound as e:
            errors.append((root, e))
    raise next((e for root, e in reversed(errors) if root is not None), errors[0][1])


def _found(name: str, models: Path | None) -> bool:
    try:
        names.resolve("checkpoint", name, models)
        return True
    except names.NameNotFound:
        return False


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

    def use_networks(self, loras: list[tuple[Path, float]],
                     hypernetworks: list[tuple[Path, float]]) -> None:
        """Set the batch's LoRA and hypernetwork weights; files load once, the model never
        reloads."""
        from sdbatch.models.hypernetwork import Hypernetworks
        from sdbatch.models.lora import LoraSet

        LoraSet(self.pipe).apply(loras)
        Hypernetworks(self.pipe).apply(hypernetworks)

    def check_loras(self, paths: list[Path]) -> None:
        """Refuse a LoRA that does not fit this model, before any image is rendered."""
        from sdbatch.models.lora import check_lora

        for path in paths:
            check_lora(path, self.pipe)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for name in ("unet", "vae", "text_encoder",
                                                              "text_encoder_2")
                   if (m := getattr(self.pipe, name, None)) is not None for p in m.parameters())


def load(spec: StackSpec, device: torch.device) -> Stack:
    """Load a stack fully offline, in its dtype, on the device: a diffusers folder as it
    is, a single file through its family's shipped configs, then the VAE override."""
    quiet_libraries()
    from diffusers import DiffusionPipeline

    dtype = pick_dtype(spec.dtype, device)
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
