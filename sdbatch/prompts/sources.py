"""Where prompts come from besides the job's own text: a prompt file, styles, dynamic
prompts. Each is rewritten into an ordinary job before the matrix sees it:

- a prompt file becomes lists zipped together (one row per line),
- styles are applied to every prompt and negative prompt,
- combinatorial variants replace each prompt by its variants (a zip partner repeats).

The result is self-contained: it is what PNGs embed, so `reproduce` needs none of the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdbatch import schema
from sdbatch.prompts import prompt_file
from sdbatch.prompts.dynamic import DynamicPrompts
from sdbatch.prompts.styles import apply_style, load_styles
from sdbatch.schema import Job, JobError, Origin, Problem
from sdbatch.text_files import TextFileError

PROMPT_KEYS = ("prompt", "negative_prompt")


def _get(raw: dict, key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def _set(raw: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


def _rewrite(raw: dict, key: str, fn) -> None:
    """Replace each value of ``key`` by the values fn(value); zip partners repeat alongside."""
    group = next((g for g in raw["zip"] if key in g), None)
    value = _get(raw, key)
    if group is None:
        new = [v for x in (value if isinstance(value, list) else [value]) for v in fn(x)]
        _set(raw, key, new if isinstance(value, list) or len(new) != 1 else new[0])
        return
    columns: dict[str, list] = {k: [] for k in group}
    for i, x in enumerate(value):
        for v in fn(x):
            for k in group:
                columns[k].append(v if k == key else _get(raw, k)[i])
    for k, column in columns.items():
        _set(raw, k, column)


def _prompt_file(job: Job, raw: dict, origin: Origin, problems: list[Problem]) -> set[str]:
    """Lines -> zipped lists; returns the keys the file set."""
    path = Path(job.prompt_file)
    source = str(path)
    if not path.is_file():
        problems.append(Problem("prompt_file", f"no such file: {path}", origin("prompt_file")))
        return set()
    if job.prompt != "":
        problems.append(Problem("prompt", "give prompt or prompt_file, not both (on the "
                                "command line, '~prompt' drops the job's prompt)",
                                origin("prompt")))
    recipes, bad = prompt_file.read(path)
    problems += [Problem("prompt_file", msg, source) for msg in bad]
    keys = list(dict.fromkeys(["prompt", *(k for r in recipes for k in r)]))
    zipped = {k for group in job.zip for k in group}
    if job.params.seed == -1 and "params.seed" not in {*zipped, *keys}:
        keys.append("params.seed")  # the script renders each line with a seed of its own
    for key in keys:
        if key != "prompt" and isinstance(schema.get(job, key), tuple):
            problems.append(Problem(key, f"{path} sets {key} on some lines, and the job gives "
                                    "it as a list too: keep one of them", origin(key)))
        if key in zipped:
            problems.append(Problem(key, f"{path} sets {key}, which is in a zip group: lines "
                                    "are already paired", origin("zip")))
    if problems:
        return set()
    for key in keys:
        _set(raw, key, [r.get(key, _get(raw, key)) for r in recipes])
    raw["zip"].append(keys)
    raw["prompt_file"] = None
    return set(keys)


def _styles(job: Job, raw: dict, origin: Origin, problems: list[Problem]) -> None:
    path = Path(job.paths.styles)
    if not path.is_file():
        problems.append(Problem("styles", f"styles need the WebUI's styles.csv at "
                                f"paths.styles = {path}, which does not exist",
                                origin("paths.styles")))
        return
    try:
        known = load_styles(path)
    except TextFileError as e:
        problems.append(Problem("paths.styles", str(e), origin("paths.styles")))
        return
    unknown = [s for s in job.styles if s not in known]
    if unknown:
        problems.append(Problem("styles", f"no style named {', '.join(unknown)} in {path}; "
                                f"styles there: {', '.join(known) or 'none'}",
                                origin("styles")))
        return
    for i, key in enumerate(PROMPT_KEYS):
        for name in job.styles:
            _rewrite(raw, key, lambda x, s=known[name][i]: [apply_style(x, s)])
    raw["styles"] = []


def normalize(job: Job, origin: Origin) -> Job:
    """The job with its prompt file, styles and combinatorial variants written in."""
    raw = schema.to_dict(job)
    problems: list[Problem] = []
    from_file: set[str] = set()
    if job.prompt_file:
        from_file = _prompt_file(job, raw, origin, problems)
    if job.styles:
        _styles(job, raw, origin, problems)
    mode = job.dynamic_prompts.mode
    if mode != "off" and not problems:
        dynamic = DynamicPrompts(mode, Path(job.paths.wildcards),
                                 job.dynamic_prompts.max_variants)
        for key in PROMPT_KEYS:
            value = _get(raw, key)
            for text in value if isinstance(value, list) else [value]:
                problems += [Problem(key, msg, origin(key)) for msg in dynamic.problems(text)]
        if mode == "combinatorial" and not problems:
            for key in PROMPT_KEYS:
                _rewrite(raw, key, dynamic.variants)
            raw["dynamic_prompts"]["mode"] = "off"
    if problems:
        raise JobError(problems)
    source = str(job.prompt_file)
    return schema.validate(raw, lambda key: source if key.split("[")[0] in from_file
                           else origin(key))
