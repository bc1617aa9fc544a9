"""A job's model section -> stack specs and network files, every file found (names as in
the WebUI) before any work, each problem reported with its key.

models/ loads what a spec says; this module is where the job's words meet it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdbatch.models import families, hashing, hub, names, tiny
from sdbatch.models.single_file import ModelFileError
from sdbatch.models.stack import EMBEDDED, NetworkFile, StackSpec
from sdbatch.prompts.parser import extract_extra_networks
from sdbatch.schema import Job, Model, Paths, Problem


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


def resolve_controlnets(job: Job, origin=lambda key: "the job"
                        ) -> tuple[dict[tuple[str, str], NetworkFile], list[Problem]]:
    """Every ControlNet model the job's units name -> its file, found before any work
    (paths.models/ControlNet/, the tiny family's ControlNet/ on `tiny`, or a path)."""
    from sdbatch.models.hashing import legacy_hash

    roots = _roots(job)
    files: dict[tuple[str, str], NetworkFile] = {}
    problems: list[Problem] = []
    groups = [("controlnet", job.controlnet)] + [
        (f"post[{i}].{step.kind}.controlnet", getattr(step.step, "controlnet", None) or ())
        for i, step in enumerate(job.post)]
    for where, units in groups:
        for n, unit in enumerate(units):
            key = f"{where}[{n}].model"
            for name in (unit.model if isinstance(unit.model, tuple) else (unit.model,)):
                if ("controlnet", name) in files:
                    continue
                try:
                    path = _find_in(roots, "controlnet", name)
                except names.NameNotFound as e:
                    problems.append(Problem(key, str(e), origin(key)))
                    continue
                files[("controlnet", name)] = NetworkFile(path, hashing.model_hash(path),
                                                          legacy_hash(path))
    return files, problems


def unet_config(spec: StackSpec) -> dict:
    """The stack's UNet config, read without loading it: a diffusers folder's own, or the
    config a single file is built from (model.config, else its family's shipped one)."""
    folder = spec.path if spec.path.is_dir() else (spec.config or
                                                   families.config_folder(spec.family))
    return json.loads((Path(folder) / "unet" / "config.json").read_text())


def controlnet_problems(plan, specs: dict[str, StackSpec],
                        files: dict[tuple[str, str], NetworkFile],
                        origin=lambda key: "the job") -> list[Problem]:
    """A ControlNet that does not fit the stack a stage runs it on (an SDXL ControlNet on
    an SD1.x stack, or the reverse), found from shapes before any work."""
    from sdbatch.models import controlnet

    by_identity = {s.identity: s for s in specs.values() if s is not None}
    problems: dict[tuple[str, str], Problem] = {}
    for chain in plan.chains.values():
        for depth, call in enumerate(chain):
            spec = by_identity.get(call.stack)
            for unit in call.params.get("controlnet", ()):
                pair = (unit["model"], call.stack)
                if spec is None or pair in problems:
                    continue
                where = "controlnet" if depth == 0 else f"post[{depth - 1}].{call.kind}"
                try:
                    why = controlnet.misfit(files[("controlnet", unit["model"])].path,
                                            unet_config(spec), spec.name)
                except ModelFileError as e:
                    why = str(e)
                if why:
                    problems[pair] = Problem(f"{where}.controlnet", why,
                                             origin(f"{where}.controlnet"))
    return list(problems.values())


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
