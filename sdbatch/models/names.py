"""Model names -> files, as the WebUI finds them.

A bare name ("dreamshaper_8", "LegoAlrev.safetensors", "sub/x") is looked up in the kind's
subfolder of paths.models (Stable-diffusion/, VAE/, Lora/, embeddings/, hypernetworks/,
ESRGAN/ and the other upscaler folders, GFPGAN/, Codeformer/, ControlNet/; embeddings also
in the WebUI's own embeddings/ beside models/), with or without its extension, in
subfolders too (linked ones included); an existing path is taken as is. Of files that differ
only in extension the WebUI's choice wins (.safetensors first). An unknown name fails up
front with the nearest names that do exist.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from sdbatch.models import safetensors_header

SUBFOLDERS = {
    "checkpoint": ("Stable-diffusion",),
    "vae": ("VAE",),
    "lora": ("Lora", "LyCORIS"),
    "embedding": ("embeddings",),
    "hypernetwork": ("hypernetworks",),
    # the WebUI's upscaler folders, then ComfyUI's
    "upscaler": ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "upscale_models"),
    "face_restorer": ("GFPGAN", "Codeformer"),
    "controlnet": ("ControlNet",),
}
EXTENSIONS = {
    "checkpoint": (".safetensors", ".ckpt", ".pt", ".pth"),
    "vae": (".safetensors", ".pt", ".ckpt", ".bin"),
    "lora": (".safetensors", ".pt"),
    "embedding": (".pt", ".safetensors", ".bin"),
    "hypernetwork": (".pt",),
    "upscaler": (".safetensors", ".pth", ".pt"),
    "face_restorer": (".pth", ".safetensors", ".pt"),
    "controlnet": (".safetensors", ".pth", ".pt", ".ckpt", ".bin"),
}
# the WebUI's face restorer names -> its folder and what its file's name holds there
FACE_RESTORERS = {"GFPGAN": ("GFPGAN", "gfpgan"), "CodeFormer": ("Codeformer", "codeformer")}
FOLDERS_ALLOWED = ("checkpoint", "vae", "controlnet")  # diffusers folders


class NameNotFound(LookupError):
    pass


class AmbiguousName(NameNotFound):
    """A name of several files: an answer, not a miss (no other root is tried)."""


def roots(kind: str, models: Path | None) -> list[Path]:
    """The folders a kind's names are looked up in: models/<sub>, and for embeddings also
    the WebUI's <webui>/embeddings beside models/ (where a stock install keeps them)."""
    if models is None:
        return []
    found = [models / sub for sub in SUBFOLDERS[kind]]
    if kind == "embedding":
        found.append(models.parent / "embeddings")
    return found


def candidates(kind: str, models: Path | None) -> list[Path]:
    """Every file (and diffusers folder, where allowed) of a kind under paths.models."""
    found: list[Path] = []
    seen: set[str] = set()
    for root in roots(kind, models):
        for folder, dirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a link back up: walked already
                dirs.clear()
                continue
            seen.add(real)
            here = Path(folder)
            if kind in FOLDERS_ALLOWED and ({"model_index.json", "config.json"} & set(files)):
                if "model_index.json" in files or kind in ("vae", "controlnet"):
                    found.append(here)
                    dirs.clear()  # its weight files are parts, not models
                    continue
            dirs.sort()
            found += [here / f for f in sorted(files)
                      if Path(f).suffix.lower() in EXTENSIONS[kind]]
    return found


def resolve(kind: str, name: str, models: Path | None) -> Path:
    """The file or folder a name means, or NameNotFound listing the nearest names."""
    direct = Path(name).expanduser()
    if direct.is_absolute() or direct.exists():
        if direct.exists():
            return direct
        raise NameNotFound(f"no such file or folder: {direct}")
    files = candidates(kind, models)
    wanted = name.replace("\\", "/")
    matches = [p for p in files
               if wanted in ((rel := p.relative_to(_root_of(p, kind, models)).as_posix()),
                             p.name, stem(rel), stem(p.name))]
    files_meant = {(root, stem(p.relative_to(root).as_posix()))
                   for p in matches for root in [_root_of(p, kind, models)]}
    if len(files_meant) > 1:  # not one file in several formats: several files
        listed = ", ".join(sorted(shown_under(models, p) for p in matches))
        raise AmbiguousName(f"'{name}' names {len(files_meant)} {kind} files: {listed}; give "
                           "one by its subfolder (sub/name) or its path")
    if matches:  # x.ckpt and x.safetensors: the extension the WebUI prefers
        return min(matches, key=lambda p: _extension_rank(kind, p))
    if kind == "lora":  # the name the file says it was trained as: the WebUI's alias
        aliased = [p for p in files if p.suffix.lower() == ".safetensors"
                   and trained_name(p) == wanted]
        if aliased:
            return aliased[0]
    names = [stem(p.relative_to(_root_of(p, kind, models)).as_posix()) for p in files]
    where = (f"under {' or '.join(str(r) for r in roots(kind, models))}" if models
             else "(paths.models is not set, so only paths are looked up)")
    close = difflib.get_close_matches(stem(wanted), names, n=3, cutoff=0.4)
    hint = f"; nearest: {', '.join(close)}" if close else (
        f"; found: {', '.join(names[:8])}" if names else "")
    raise NameNotFound(f"no {kind} named '{name}' {where}{hint}")


def trained_name(path: Path) -> str | None:
    """A LoRA's ss_output_name (its training run's name, which prompts copied from the
    WebUI use where it prefers aliases), from the .safetensors header alone."""
    try:
        metadata = safetensors_header.read(path)[0].get("__metadata__") or {}
    except (OSError, ValueError):
        return None
    name = metadata.get("ss_output_name")
    return name if isinstance(name, str) and name else None


WEBUI_VAE_SUFFIXES = (".ckpt", ".pt", ".safetensors")  # the order the WebUI globs them in


def vae_near_checkpoint(checkpoint: Path, models: Path | None) -> Path | None:
    """The WebUI's "Automatic" VAE of a single-file checkpoint: the first VAE file, in the
    order the WebUI lists them, whose name starts with the checkpoint's (`x.vae.pt` for
    `x.safetensors`). That order: `*.vae.ckpt`, `*.vae.pt`, `*.vae.safetensors` under
    Stable-diffusion/, then `*.ckpt`, `*.pt`, `*.safetensors` under VAE/ (natural order
    within each). A checkpoint outside Stable-diffusion/ also finds its `*.vae.*` beside it."""
    start = checkpoint.name.rsplit(".", 1)[0]
    ours = [p for p in candidates("checkpoint", models) if p.is_file()]
    if not any(p.parent == checkpoint.parent for p in ours) and checkpoint.parent.is_dir():
        ours += [p for p in checkpoint.parent.iterdir() if p.is_file()]  # not recursive
    vaes = [p for p in candidates("vae", models) if p.is_file()]
    order = [p for suffix in WEBUI_VAE_SUFFIXES for p in sorted(
        (p for p in ours if p.name.lower().endswith(".vae" + suffix)), key=_glob_order)]
    order += [p for suffix in WEBUI_VAE_SUFFIXES for p in sorted(
        (p for p in vaes if p.suffix.lower() == suffix), key=_glob_order)]
    return next((p for p in order if p.name.startswith(start)), None)


def _glob_order(p: Path) -> tuple:
    """glob's `**` order, made stable: a folder's own files (in natural order) before its
    subfolders' (in natural order of the subfolder)."""
    return (*((1, _natural(part)) for part in p.parent.parts), (0, _natural(p.name)))


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def shown_under(models: Path | None, p: Path) -> str:
    """A model file as it lies under paths.models (Lora/a/x.safetensors)."""
    return p.relative_to(models).as_posix() if models and models in p.parents else str(p)


def face_restorer(name: str, models: Path | None) -> Path:
    """A face restorer's file. The WebUI's names take the first file (in natural order) of
    its folder whose name holds the model's (GFPGAN/GFPGANv1.4.pth,
    Codeformer/codeformer-v0.1.0.pth); anything else is a file stem or a path."""
    if name not in FACE_RESTORERS:
        return resolve("face_restorer", name, models)
    folder, part = FACE_RESTORERS[name]
    files = sorted((p for p in candidates("face_restorer", models)
                    if p.parent.is_relative_to(models / folder) and part in p.name.lower()),
                   key=lambda p: _natural(p.as_posix()))
    if files:
        return files[0]
    where = (f"under {models / folder}" if models
             else "(paths.models is not set, so no folder was searched)")
    raise NameNotFound(f"no {name} model file {where}: the WebUI's {folder}/ folder holds a "
                       f".pth or .safetensors whose name has '{part}' (e.g. the WebUI's "
                       f"{'GFPGANv1.4.pth' if name == 'GFPGAN' else 'codeformer-v0.1.0.pth'}"
                       "); put one there, set paths.models, or give a file's path")


def _root_of(p: Path, kind: str, models: Path | None) -> Path:
    for root in roots(kind, models):
        if root in p.parents:
            return root
    return p.parent


def _extension_rank(kind: str, p: Path) -> int:
    order = EXTENSIONS[kind]
    return order.index(p.suffix.lower()) if p.suffix.lower() in order else len(order)


def stem(name: str) -> str:
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def embeddings_in(roots: list[Path | None]) -> dict[str, Path]:
    """Every embedding under the roots' embeddings/ folders (subfolders too) by its trigger,
    the file stem, as the WebUI loads them all at start; the first root that has a stem wins."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in candidates("embedding", root):
            if path.is_file():
                found.setdefault(stem(path.name), path)
    return found
