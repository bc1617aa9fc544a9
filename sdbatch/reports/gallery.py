"""index.html in a run folder: every image with its recipe and chain, filtered by any axis
value, sorted, two side by side; links to the grids, control images, masks and kept
intermediates.

One self-contained file (inline CSS and JS, no network), so it opens from file:// on any
machine the folder is copied to. Thumbnails are the image files by relative URL, not inline
data: the page of a 10 000-image sweep stays a few MB and is cheap to rewrite while the run
goes. Everything the page shows is built from the run folder alone (run.json, the manifest,
what is on disk), so a run in progress or interrupted shows what exists. The data is JSON in
a ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` escaped, and the
page builds its DOM with textContent and properties, never innerHTML: a prompt or file name
is shown as text, whatever it holds.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from sdbatch import atomic, schema
from sdbatch.inputs import shown
from sdbatch.output import manifest
from sdbatch.output.lock import Holder, pid_alive, read_holder

FILE = "index.html"
EVERY_S = 30.0  # a run rewrites its gallery at most this often (and at its end)
SHARE = 0.1  # ... and never spends more than this share of the run's time on it

# a step's record keys that follow from others (sizes, file hashes, model records): no axis
DERIVED = {"input_size", "output_size", "map", "sha256", "model_hash", "short_hash",
           "architecture"}


def write(run_dir: Path) -> Path:
    """(Re)write ``run_dir``/index.html from what the folder holds now, atomically."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not an sdbatch run folder (no run.json); give "
                                "the folder a run writes (outputs/<job>/<date>)")
    path = run_dir / FILE
    atomic.write_text(path, page(collect(run_dir)))
    return path


class Updater:
    """The gallery of a run in progress: written at the first call, then at most every
    ``every_s`` seconds and never more than ``SHARE`` of the time (a big sweep's page takes
    a while to build); ``force`` writes now (the end of the run)."""

    def __init__(self, run_dir: Path, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dir, self.every_s, self.clock = Path(run_dir), every_s, clock
        self._next = float("-inf")

    def __call__(self, force: bool = False) -> None:
        start = self.clock()
        if not force and start < self._next:
            return
        write(self.run_dir)
        took = self.clock() - start
        self._next = start + max(self.every_s, took / SHARE)


def run_state(info: dict[str, Any], holder: Holder | None, host: str,
              alive: Callable[[int], bool]) -> str:
    """The run's state as a reader sees it: run.json says ``running`` until its session
    ends, also after a kill; then the lock note tells: no note, or a note of a dead process
    of this host, is a run that was stopped (resume it)."""
    status = info.get("status", "starting")
    if status != "running":
        return status
    if holder is None or (holder.host == host and not alive(holder.pid)):
        return "interrupted"
    return "running" if holder.host == host else f"running on {holder.host}"


def collect(run_dir: Path) -> dict[str, Any]:
    """The page's data: the run, its axes, every image in the manifest, the grids."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    entries = [manifest.present(run_dir, e)
               for _, e in sorted(manifest.read(run_dir / "manifest.jsonl").items())]
    flat = [flatten(e.get("recipe", {})) for e in entries]
    axes = find_axes(flat)
    grids = sorted((run_dir / "grids").glob("*.png")) if (run_dir / "grids").is_dir() else []
    counts = {s: sum(e.get("status") == s for e in entries) for s in ("ok", "failed", "missing")}
    return {
        "run": {"job": _job_name(run_dir), "folder": run_dir.resolve().name,
                "path": shown(run_dir.resolve()),  # as a command here names it
                "status": run_state(info, read_holder(run_dir), socket.gethostname(),
                                    pid_alive),
                "total": info.get("images"), "done": counts["ok"], "failed": counts["failed"],
                "missing": counts["missing"],
                **{k: info.get(k) for k in ("created", "started", "ended")},
                "written": dt.datetime.now(dt.timezone.utc).astimezone()
                .isoformat(timespec="seconds")},
        "axes": [{"key": k, "values": v} for k, v in axes.items()],
        "images": [image(run_dir, e, {k: f.get(k) for k in axes})
                   for e, f in zip(entries, flat, strict=True)],
        "grids": [{"name": g.name, "src": _url(g.relative_to(run_dir))} for g in grids],
    }


def _job_name(run_dir: Path) -> str:
    try:
        job = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return str(job["job"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return run_dir.parent.name


def _url(relative: Path | str) -> str:
    """A relative URL of a file in the run folder: each part percent-encoded, so a name with
    '#', '?', '%' or ':' still loads, and none reads as a scheme."""
    return "/".join(quote(part, safe="") for part in Path(relative).parts)


def _link(run_dir: Path, path: str) -> dict[str, Any]:
    """A job's input file (init image, mask, control image) as the manifest names it: by a
    relative URL from the run folder when it is there to be found (a relative path is the
    folder the run was started in, recorded in run.json), else by its path only. Inputs
    are linked where they lie, not copied: a run folder moved away loses those links."""
    from sdbatch.output.run_folder import RunFolder

    started = RunFolder.started_in(run_dir)
    base = started if started is not None and started.is_dir() else Path.cwd()
    file = Path(path) if Path(path).is_absolute() else base / path
    if not file.is_file():
        return {"path": path, "src": None}
    try:
        return {"path": path, "src": _url(os.path.relpath(file, run_dir.resolve()))}
    except ValueError:  # another drive (Windows)
        return {"path": path, "src": file.resolve().as_uri()}


def flatten(recipe: dict[str, Any]) -> dict[str, Any]:
    """An image's recipe as the job's dotted keys (``prompt``, ``params.cfg_scale``,
    ``model.checkpoint``, ``controlnet.0.weight``, ``post.0.hires_fix.denoise``) -> value;
    lists of plain values as JSON text. A post-step's key that only repeats the image's
    own value (its unset sampler, prompt, ...) is left out."""
    short = _axes()
    base = recipe.get("params", {})
    out: dict[str, Any] = {}
    if "model" in recipe:
        out["model.checkpoint"] = recipe["model"].get("name")
    for key, value in base.items():
        _put(out, short.get(key, f"params.{key}"), value)
    for n, stage in enumerate(recipe.get("stages", [])[1:]):
        for key, value in stage.get("params", {}).items():
            if key in DERIVED or key.endswith(("_sha256", "_model")) or (
                    key in base and base[key] == value):
                continue
            _put(out, f"post.{n}.{stage['kind']}.{key}", value)
    return out


@functools.cache
def _axes() -> dict[str, str]:
    return schema.axes()  # type hints evaluated: slow enough to matter once per image


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if key.endswith("controlnet") and isinstance(value, list):
        for n, unit in enumerate(value):
            for k, v in unit.items():
                if k not in DERIVED and not k.endswith(("_sha256", "_hash")):
                    _put(out, f"{key}.{n}.{k}", v)
    elif isinstance(value, dict):
        return  # a record (an upscaler model's): it follows its name, which is a key
    elif isinstance(value, list):
        out[key] = json.dumps(value, ensure_ascii=False)
    else:
        out[key] = value


def find_axes(flat: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The keys whose values differ between images -> their values, sorted (numbers by
    size, then text); the table's keys in the job's matrix order (outermost first), then
    the ControlNet units' and post-steps' as the recipe names them."""
    table = {key: n for n, key in enumerate(_axes().values())}
    keys = sorted(dict.fromkeys(k for f in flat for k in f), key=lambda k: table.get(k, len(table)))
    out = {}
    for key in keys:
        values = {(type(f.get(key)), f.get(key)): f.get(key) for f in flat}  # 1 is not 1.0
        if len(values) > 1:
            out[key] = sorted(values.values(), key=_order)
    return out


def _order(value: Any) -> tuple:
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def image(run_dir: Path, entry: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """One image's card: its file, status, axis values, recipe, chain and control images."""
    recipe = entry.get("recipe", {})
    file = entry.get("file")
    return {
        "index": entry["index"], "id": entry.get("id", f"{entry['index']:05d}"),
        "file": file, "src": _url(file) if file else None,
        "status": entry.get("status"), "error": entry.get("error"),
        "seed": entry.get("seed"), "sha256": entry.get("sha256"),
        "timings": entry.get("timings"), "values": values, "recipe": recipe,
        "chain": chain(run_dir, recipe.get("stages", []), file),
        "controls": [{"name": Path(c).name, "src": _url(c) if (run_dir / c).is_file() else None}
                     for c in entry.get("controlnet", [])],
    }


def chain(run_dir: Path, stages: list[dict[str, Any]], file: str | None
          ) -> list[dict[str, Any]]:
    """Each stage of an image with its picture: the last stage's is the image; an earlier
    one's is intermediates/<key>.png, there while the run goes and after it when
    run.keep_intermediates is set. An init image, a mask and a ControlNet image link to
    their files."""
    out = []
    for n, stage in enumerate(stages):
        params = stage.get("params", {})
        last = n == len(stages) - 1
        kept = run_dir / "intermediates" / f"{stage.get('key')}.png"
        picture = (_url(file) if last and file else
                   _url(kept.relative_to(run_dir)) if not last and kept.is_file() else None)
        inputs = []
        if stage.get("kind") == "image" and "path" in params:
            inputs.append({"label": "init image", **_link(run_dir, params["path"])})
        if "mask" in params:
            inputs.append({"label": "mask", **_link(run_dir, params["mask"])})
        for u, unit in enumerate(params.get("controlnet") or []):
            if "image" in unit:
                inputs.append({"label": f"ControlNet {u} image", **_link(run_dir, unit["image"])})
            if "map" in unit and (run_dir / "controlnet" / f"{unit['map']}.png").is_file():
                inputs.append({"label": f"ControlNet {u} control map", "path": unit["map"],
                               "src": _url(f"controlnet/{unit['map']}.png")})
        out.append({"kind": stage.get("kind"), "key": stage.get("key"), "params": params,
                    "picture": picture, "kept": last or picture is not None, "inputs": inputs})
    return out


def embed(data: Any) -> str:
    """JSON that cannot end or alter the script block it sits in."""
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def page(data: dict[str, Any]) -> str:
    """The page: gallery.html (its CSS and JS inline) with the data written in. Its
    Content-Security-Policy allows no network and runs only its own script, by hash: a
    script that got into the page some other way would not run."""
    template = Path(__file__).with_name("gallery.html").read_text(encoding="utf-8")
    script = template.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (template.replace("'SCRIPT-HASH'", f"'sha256-{digest}'", 1)
            .replace("/*DATA*/", embed(data), 1))
