"""A job's model section -> stack specs and network files, every file found (names as in
the WebUI) before any work, each problem reported with its key.

models/ loads what a spec says; this module is where the job's words meet it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

from sdbatch import faces
from sdbatch.models import families, hashing, hub, names, tiny
from sdbatch.models.image_models import ImageModelFile, identify
from sdbatch.models.single_file import ModelFileError
from sdbatch.models.stack import (
    EMBEDDED,
    SWITCHES,
    NetworkFile,
    StackSpec,
)
from sdbatch.models.upscaler_models import UpscalerFile
from sdbatch.plan import EXTRAS_RESTORERS
from sdbatch.prompts.parser import extract_extra_networks
from sdbatch.schema import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    Executor,
    Job,
    Model,
    Paths,
    Problem,
)

NO_VAE = "None"  # model.vae: the checkpoint's own VAE, even with a VAE named like it


def _models_dir(paths: Paths) -> Path | None:
    return Path(paths.models).expanduser() if paths.models else None


def resolve(model: Model, paths: Paths, checkpoint: str, origin=lambda key: "the job",
            device: str = "auto", switches: tuple[str, ...] = ()
            ) -> tuple[StackSpec | None, list[Problem]]:
    """The spec for one checkpoint of a job's model section, to run on ``device`` (the
    executor's) with the speed ``switches`` that are on (see speed_switches), or the
    problems that stop it."""
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

    from_hub = hub.is_hub_id(checkpoint) and not _found(checkpoint, models)
    if checkpoint in EMBEDDED:
        path: Path | None = EMBEDDED[checkpoint]()
    elif from_hub:
        try:
            path = hub.fetch(checkpoint)
        except hub.HubError as e:
            try:  # a mistyped local folder/name looks like a hub id: say what is there too
                _find_in(roots, "checkpoint", checkpoint)
            except names.NameNotFound as missing:
                e = hub.HubError(f"{e}; and {missing}")
            problems.append(Problem("model.checkpoint", str(e), origin("model.checkpoint")))
            path = None
    else:
        path = find("checkpoint", checkpoint, "model.checkpoint")
        embedded = difflib.get_close_matches(checkpoint, list(EMBEDDED), n=1)
        if path is None and embedded:
            problems[-1] = dataclasses.replace(problems[-1], message=(
                f"{problems[-1].message}; or did you mean '{embedded[0]}', the embedded model?"))
    vae = find("vae", model.vae, "model.vae") if model.vae not in (None, NO_VAE) else None
    config = Path(model.config).expanduser() if model.config else None
    if config is not None and not (config / "model_index.json").is_file():
        problems.append(Problem("model.config", f"{config} is not a diffusers folder (no "
                                "model_index.json)", origin("model.config")))
    embeddings = tuple(find("embedding", e, "model.embeddings") for e in model.embeddings)
    if path is not None and path.is_dir() and (why := _not_a_pipeline(path)):
        problems.append(Problem("model.checkpoint", f"{path} is not a diffusers folder ({why}); "
                                "give a .safetensors or .ckpt file, a diffusers folder, or a "
                                "name under paths.models/Stable-diffusion",
                                origin("model.checkpoint")))
    if problems or path is None:
        return None, problems
    family = model.family
    if path.is_file() and config is None:
        try:
            detected = families.detect_family(path, model.allow_pickle)
            if family == "auto":
                family = detected
            else:
                families.check_compatible(family, detected, str(path))
        except ModelFileError as e:
            return None, [Problem("model.checkpoint", str(e), origin("model.checkpoint"))]
    if model.vae is None and path.is_file():  # the WebUI's "Automatic"
        vae = names.vae_near_checkpoint(path, models)
    name = checkpoint if checkpoint in EMBEDDED or from_hub else names.stem(path.name)
    return StackSpec(name, path, model.dtype, family, vae, embeddings, model.allow_pickle,
                     config, device, switches), []


def _not_a_pipeline(folder: Path) -> str | None:
    """Why a checkpoint folder cannot load as a diffusers pipeline, or None."""
    index = folder / "model_index.json"
    if not index.is_file():
        return "no model_index.json"
    try:
        named = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return "its model_index.json is not a JSON object"
    return None if named else "its model_index.json names no _class_name"


def speed_switches(executor: Executor) -> tuple[str, ...]:
    """The executor's speed switches that are on: they go into every stack's identity."""
    return tuple(name for name in SWITCHES if getattr(executor, name))


def resolve_networks(job: Job, renders, origin=lambda key: "the job"
                     ) -> tuple[dict[tuple[str, str], NetworkFile], list[Problem]]:
    """Every LoRA and hypernetwork the renders use -> its file, found before any work."""
    from sdbatch.models.hypernetwork import hypernetwork_hash
    from sdbatch.models.lora import lora_hash
    from sdbatch.models.networks_errors import NetworkError

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
        try:
            digest = lora_hash(path) if kind == "lora" else hypernetwork_hash(path)
        except NetworkError as e:  # a corrupt or cut-short file: named with its fix
            problems.append(Problem(key, str(e), origin(key)))
            continue
        files[(kind, name)] = NetworkFile(path, digest)
    for text in dict.fromkeys(r.prompt for r in renders):
        for tag in extract_extra_networks(text)[1]:
            if tag.network in ("lora", "hypernet") and (problem := tag.problem()):
                problems.append(Problem("prompt", problem, origin("prompt")))
    return files, problems


def resolve_face_restorers(job: Job, origin=lambda key: "the job"
                           ) -> tuple[dict[str, ImageModelFile], list[Problem]]:
    """Every face restorer the post-steps name (a face_restore's model, an upscale's GFPGAN
    and CodeFormer when their visibility is above 0) -> its file, read under the checkpoints'
    pickle rule and identified (architecture, hash) before any work."""
    def values(x):
        return x if isinstance(x, tuple) else (x,)

    wanted: dict[str, str] = {}  # name -> the key that asks for it
    for i, step in enumerate(job.post):
        if step.kind == "face_restore":
            for name in values(step.face_restore.model):
                wanted.setdefault(name, f"post[{i}].face_restore.model")
        if step.kind == "upscale":
            for name, key in EXTRAS_RESTORERS:
                if any(v > 0 for v in values(getattr(step.upscale, key))):
                    wanted.setdefault(name, f"post[{i}].upscale.{key}")
    files: dict[str, ImageModelFile] = {}
    problems: list[Problem] = []
    if wanted and (why := faces.detector_problem()):
        key = next(iter(wanted.values()))
        problems.append(Problem(key, why, origin(key)))
    for name, key in wanted.items():
        try:
            file = identify(names.face_restorer(name, _models_dir(job.paths)),
                            job.model.allow_pickle)
        except (names.NameNotFound, ModelFileError) as e:
            problems.append(Problem(key, str(e), origin(key)))
            continue
        expected = (name,) if name in names.FACE_RESTORERS else tuple(names.FACE_RESTORERS)
        if file.architecture not in expected:
            problems.append(Problem(key, f"{file.path} is a {file.architecture} model, not "
                                    f"{' or '.join(expected)}: give a face restorer's file",
                                    origin(key)))
            continue
        files[name] = file
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
    return json.loads((Path(folder) / "unet" / "config.json").read_text(encoding="utf-8"))


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
        used = dict.fromkeys(n for r in renders if checkpoint in _checkpoints(r)
                             for n in r.embeddings)
        out[checkpoint] = dataclasses.replace(spec, embeddings=tuple(files[n] for n in used))
    return out


def _checkpoints(render) -> set[str]:
    """The checkpoints an image's chain samples with: its own and its steps' (hires fix)."""
    return {render.checkpoint} | {c for s in render.post
                                  if (c := dict(s.values).get("checkpoint"))}


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
        except names.AmbiguousName:
            raise
        except names.NameNotFound as e:
            errors.append((root, e))
    raise next((e for root, e in reversed(errors) if root is not None), errors[0][1])


def _found(name: str, models: Path | None) -> bool:
    try:
        names.resolve("checkpoint", name, models)
        return True
    except names.NameNotFound:
        return False


def resolve_upscalers(job: Job, origin=lambda key: "the job"
                      ) -> tuple[dict[str, UpscalerFile], list[Problem]]:
    """Every upscaler model the post-steps name -> its file (under paths.models, then the
    embedded family's own folder for jobs on it), found, hashed and loaded once to check
    it (spandrel must know its architecture; a pickle needs model.allow_pickle), all before
    any work. Built-in and latent upscalers need no file."""
    from sdbatch.models import spandrel_files
    from sdbatch.models.upscaler_models import check, resolve

    roots = [r for r in _roots(job) if r is not None and r.is_dir()] or [None]
    folders = ",".join(names.SUBFOLDERS["upscaler"])
    where = (" and ".join(f"{r}/{{{folders}}}" for r in roots) if roots != [None]
             else "nowhere (paths.models is not set)")
    files: dict[str, UpscalerFile] = {}
    problems: list[Problem] = []
    for i, step in enumerate(job.post):
        for field in ("upscaler", "upscaler_2"):
            value = getattr(step.step, field, None)
            for name in value if isinstance(value, tuple) else (value,):
                if name in files or name in (None, "None", *IMAGE_UPSCALERS,
                                             *LATENT_UPSCALERS):
                    continue
                key = f"post.{i}.{step.kind}.{field}"
                try:
                    path = _first_upscaler(roots, name, resolve)
                    check(spandrel_files.load(path, job.model.allow_pickle), path)
                except names.NameNotFound as e:
                    problems.append(Problem(key, f"{e}. Upscalers are looked up in {where}, "
                                            "by file stem or by the WebUI's name (R-ESRGAN "
                                            "4x+ ...), or given as a path; built in: "
                                            f"{', '.join(IMAGE_UPSCALERS)}. Put the model "
                                            "file there, or fix the name", origin(key)))
                    continue
                except ModelFileError as e:
                    problems.append(Problem(key, str(e), origin(key)))
                    continue
                files[name] = UpscalerFile.of(path, name)
    return files, problems


def _first_upscaler(roots: list[Path | None], name: str, resolve) -> Path:
    """The first root that has the name; else the first root's error (paths.models')."""
    errors = []
    for root in roots:
        try:
            return resolve(name, root)
        except names.AmbiguousName:
            raise
        except names.NameNotFound as e:
            errors.append(e)
    raise errors[0]
