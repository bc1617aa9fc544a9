"""The image files a job reads (init images, inpaint masks, ControlNet images): found,
expanded, read and hashed before any work, so a missing or broken file stops the job with
its key.

A relative path is looked up in the folder sdbatch runs in, then beside the file that set
the key (the job file); the job is rewritten with the path where it was found, so the
plan, the manifest and `reproduce` all name one file. An ``init_image`` that is a folder
or a glob becomes the list of its pictures (an axis), sorted by name.
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

from sdbatch import schema
from sdbatch.images import ImageFileError, read_image
from sdbatch.masks import read_mask
from sdbatch.models import hashing
from sdbatch.plan import InputImage
from sdbatch.schema import Job, Origin, Problem

PICTURES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _bases(origin: Origin, key: str) -> list[Path]:
    bases = [Path.cwd()]
    label = origin(key)
    if label and Path(label).is_file():
        bases.append(Path(label).resolve().parent)
    return bases


def _escaped(text: str) -> str:
    """A hint where a path holds a control character: YAML read a backslash in double
    quotes as an escape ("C:\temp\new.png" holds a tab and a newline)."""
    if not any(ord(c) < 32 for c in text):
        return ""
    return (" (it holds a control character: in double quotes YAML reads a backslash as an "
            "escape; write a Windows path in single quotes or with /)")


def shown(path: Path) -> str:
    """A path as a command run here would name it: relative where it lies below this
    folder, else as given; with / between its parts on every system (Windows takes them),
    since jobs, recipes and content keys record it: a run made on Windows reproduces and
    resumes elsewhere."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        rel = str(path)
    if rel.startswith(".."):
        rel = str(path)
    return rel.replace(os.sep, "/")


def command_arg(path: Path | str) -> str:
    """A path as one argument of a command the user copies (a resume hint): as shown(),
    quoted where it needs it, in double quotes on Windows (cmd and PowerShell read those)."""
    text = shown(Path(path))
    return subprocess.list2cmdline([text]) if sys.platform == "win32" else shlex.quote(text)


def find(text: str, bases: list[Path]) -> list[Path] | None:
    """The pictures ``text`` names: a file, every picture of a folder, or a glob's matches;
    None when nothing is there."""
    candidates = [Path(text)] if Path(text).is_absolute() else [b / text for b in bases]
    for path in candidates:
        if path.is_file():  # first: "hq [v2].png" is a name, not a pattern
            return [path]
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURES)
            if found:
                return found
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path))
                           if Path(p).suffix.lower() in PICTURES)
            if found:
                return found
    return None


def _values(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def locate(job: Job, origin: Origin) -> tuple[Job, list[Problem]]:
    """The job with every image path replaced by where it was found (folders and globs
    expanded into lists), and a problem for each path that names nothing."""
    problems: list[Problem] = []
    raw = schema.to_dict(job)
    if job.init_image is not None:
        key = "init_image"
        paths: list[str] = []
        for text in _values(job.init_image):
            found = find(text, _bases(origin, key))
            if found is None:
                problems.append(Problem(key, f"no picture at {text!r} (looked in "
                                        f"{', '.join(str(b) for b in _bases(origin, key))})"
                                        + _escaped(text), origin(key)))
            else:
                paths += [shown(p) for p in found]
        if paths and len(paths) != len(_values(job.init_image)) and \
                any(key in group for group in job.zip):
            problems.append(Problem(key, "a folder or glob in a zipped init_image gives "
                                    f"{len(paths)} pictures: list them, or take init_image "
                                    "out of the zip group", origin("zip")))
        raw[key] = paths if isinstance(job.init_image, tuple) or len(paths) != 1 else paths[0]
    for i, step in enumerate(job.post):
        if step.kind != "inpaint":
            continue
        key = f"post[{i}].inpaint.mask"
        masks = _single_files(step.inpaint.mask, key, origin, problems, "mask picture",
                              "a mask is one file")
        if masks is not None:
            raw["post"][i]["inpaint"]["mask"] = masks
    for where, units, raw_units in _unit_groups(job, raw):
        for n, unit in enumerate(units):
            key = f"{where}[{n}].image"
            images = _single_files(unit.image, key, origin, problems, "control image",
                                   "give one file (a list of files is an axis)")
            if images is not None:
                raw_units[n]["image"] = images
    if problems:
        return job, problems
    return schema.validate(raw, origin), []


def _single_files(value, key: str, origin: Origin, problems: list, what: str, fix: str):
    """Each path of ``value`` (one, or a tuple: an axis) found as exactly one file, in the
    same shape, or None with a problem per path that is not."""
    paths = []
    for text in _values(value):
        found = find(text, _bases(origin, key))
        if found is None or len(found) != 1:
            looked = ", ".join(str(b) for b in _bases(origin, key))
            problems.append(Problem(key, f"no {what} at {text!r} (looked in {looked})"
                                    f"{_escaped(text)}" if found is None
                                    else f"'{text}' names {len(found)} pictures; {fix}",
                                    origin(key)))
        else:
            paths.append(shown(found[0]))
    if len(paths) != len(_values(value)):
        return None
    return paths if isinstance(value, tuple) else paths[0]


def _unit_groups(job: Job, raw: dict) -> list[tuple[str, tuple, list]]:
    """(key, units, their raw dicts) for the job's ControlNet units and each step's own."""
    groups = [("controlnet", job.controlnet, raw.get("controlnet") or [])]
    for i, step in enumerate(job.post):
        units = getattr(step.step, "controlnet", None)
        if units:
            groups.append((f"post[{i}].{step.kind}.controlnet", units,
                           raw["post"][i][step.kind]["controlnet"]))
    return groups


def read(job: Job, origin: Origin) -> tuple[dict[str, InputImage], list[Problem]]:
    """Each image file of a located job read (as a stage will read it) and hashed."""
    problems: list[Problem] = []
    out: dict[str, InputImage] = {}
    wanted = [("init_image", p, read_image) for p in _values(job.init_image) if p is not None]
    for i, step in enumerate(job.post):
        if step.kind == "inpaint":
            wanted += [(f"post[{i}].inpaint.mask", p, read_mask)
                       for p in _values(step.inpaint.mask)]
    for where, units, _ in _unit_groups(job, schema.to_dict(job)):
        wanted += [(f"{where}[{n}].image", p, read_image)
                   for n, unit in enumerate(units) for p in _values(unit.image)]
    for key, path, reader in wanted:
        if path in out:
            continue
        try:
            picture = reader(Path(path))
        except ImageFileError as e:
            problems.append(Problem(key, str(e), origin(key)))
            continue
        size = picture.size if reader is read_image else (picture.shape[1], picture.shape[0])
        out[path] = InputImage(hashing.sha256(Path(path)), tuple(size))
    return out, problems
