"""Prompts from a file, like the WebUI's "Prompts from file or textbox" script.

Each non-empty line is one recipe: either a plain prompt, or options in the script's form
`--prompt "a house" --negative_prompt "blurry" --steps 30 --cfg_scale 6 --seed 5
--sampler_name "Euler a" --width 512 --height 768`. Each line is a value of one axis that
sets all of its keys together.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from sdbatch.text_files import TextFileError, read_text

# the script's option names -> sdbatch keys, with the value type
OPTIONS: dict[str, tuple[str, type]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "sampler_name": ("params.sampler", str),
    "sampler": ("params.sampler", str),
    "scheduler": ("params.schedule_type", str),
    "schedule_type": ("params.schedule_type", str),
    "steps": ("params.steps", int),
    "cfg_scale": ("params.cfg_scale", float),
    "seed": ("params.seed", int),
    "subseed": ("params.subseed", int),
    "subseed_strength": ("params.subseed_strength", float),
    "width": ("params.width", int),
    "height": ("params.height", int),
    "clip_skip": ("params.clip_skip", int),
}


# the script's options that are one value for the whole job here, and where to give it
JOB_WIDE = {
    "n_iter": "a line's own image count is not taken; give params.batch_count for the job",
    "batch_size": "a line's own batch size is not taken; give params.batch_size for the job",
    "styles": "styles apply to the whole job: give styles: [...] in the job",
    "tiling": "tiling applies to the whole job: give params.tiling in the job",
    "restore_faces": "add a face_restore post-step to the job instead",
    "seed_resize_from_w": "give params.seed_resize_from_w in the job",
    "seed_resize_from_h": "give params.seed_resize_from_h in the job",
}


def parse_line(line: str) -> dict[str, Any]:
    """One line -> {dotted key: value}; raises ValueError saying what is wrong."""
    if not line.startswith("--"):
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"unbalanced quotes: {e}") from None
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ValueError(f"expected an --option, got '{word}'")
        name = word[2:]
        if name in JOB_WIDE:
            raise ValueError(f"--{name}: {JOB_WIDE[name]}")
        if name not in OPTIONS:
            raise ValueError(f"unknown option --{name}; options: "
                             + " ".join(f"--{o}" for o in OPTIONS))
        if i + 1 >= len(words):
            raise ValueError(f"--{name} needs a value")
        key, kind = OPTIONS[name]
        if kind is str and name in ("prompt", "negative_prompt"):  # the script joins the
            end = next((j for j in range(i + 1, len(words))  # words up to the next option
                        if words[j].startswith("--")), len(words))
            out[key] = " ".join(words[i + 1:end])
            i = end
            continue
        try:
            out[key] = kind(words[i + 1])
        except ValueError:
            raise ValueError(f"--{name} needs {kind.__name__}, got '{words[i + 1]}'") from None
        i += 2
    return out


def read(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(recipes, problems): every bad line is reported with its number, a value the job's
    schema refuses too (--steps 0)."""
    from sdbatch import schema

    recipes, problems = [], []
    try:
        text = read_text(path)
    except TextFileError as e:
        return [], [str(e)]
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            recipe = parse_line(line)
        except ValueError as e:
            problems.append(f"line {n}: {e}")
            continue
        raw: dict[str, Any] = {}
        for dotted, value in recipe.items():
            *parents, last = dotted.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        try:
            schema.validate(raw)
        except schema.JobError as e:
            problems += [f"line {n}: {p.key}: {p.message}" for p in e.problems]
            continue
        recipes.append(recipe)
    if not recipes and not problems:
        problems.append("has no prompts")
    return recipes, problems
