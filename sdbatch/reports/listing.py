"""`sdbatch ls` (the runs under a folder) and `sdbatch show` (one image's recipe, chain and
infotext), read from run folders as they are now: a run in progress or killed included."""

from __future__ import annotations

import datetime as dt
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdbatch.output import manifest, png
from sdbatch.output.lock import NOTE, pid_alive, read_holder


@dataclass(frozen=True)
class RunRow:
    path: Path
    job: str
    created: str
    ok: int
    failed: int
    total: int
    status: str
    wall_s: float | None


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


def run_status(path: Path, info: dict[str, Any]) -> str:
    """run.json's status, except a session that says "running" with no live holder of the
    folder: it was killed ("stopped")."""
    status = info.get("status", "created")
    if status != "running":
        return status
    holder = read_holder(path)
    alive = holder is not None and (holder.host != socket.gethostname() or pid_alive(holder.pid))
    return "running" if (path / NOTE).exists() and alive else "stopped"


def wall_seconds(sessions: list[dict[str, Any]], last_write: dt.datetime | None,
                 running: bool) -> float | None:
    """Seconds the run's sessions took; a session with no end ran until now (running) or
    until the last image it wrote (killed)."""
    total, known = 0.0, False
    now = dt.datetime.now(dt.timezone.utc)
    for s in sessions:
        start, end = _time(s.get("started")), _time(s.get("ended"))
        if start is None:
            continue
        end = end or (now if running else last_write)
        if end is not None:
            total += max(0.0, (end - start).total_seconds())
            known = True
    return total if known else None


def read_run(path: Path) -> RunRow:
    info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    config = path / "config.yaml"
    job = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("job", {}).get("name") \
        if config.exists() else None
    entries = manifest.read(path / "manifest.jsonl")
    statuses = [manifest.present(path, e).get("status") for e in entries.values()]
    status = run_status(path, info)
    log = path / "manifest.jsonl"
    last = (dt.datetime.fromtimestamp(log.stat().st_mtime, dt.timezone.utc)
            if log.exists() else None)
    return RunRow(path, job or path.parent.name, info.get("created", ""),
                  statuses.count("ok"), statuses.count("failed"), info.get("images", 0),
                  status, wall_seconds(info.get("sessions", []), last, status == "running"))


def stored_run(path: Path) -> dict[str, Any] | None:
    """A folder's run.json if it is an sdbatch run's (another tool's, or a torn one: None)."""
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "seed_nonce" in info else None


def find_runs(root: Path) -> list[Path]:
    """sdbatch run folders at or under ``root``, oldest first."""
    candidates = [root] if (root / "run.json").is_file() else \
        sorted(p.parent for p in root.rglob("run.json"))
    found = {p: info for p in candidates if (info := stored_run(p)) is not None}
    return sorted(found, key=lambda p: (found[p].get("created", ""), str(p)))


def duration(seconds: float | None) -> str:
    """3725 -> '1h02m05s', 65.4 -> '1m05s', 4.2 -> '4.2s'."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def ls(root: Path) -> str:
    """The runs under ``root`` as a table: job, date, images ok / failed / total, status,
    wall time, folder."""
    rows = [read_run(p) for p in find_runs(root)]
    if not rows:
        return f"no sdbatch runs under {root}"
    table = [("JOB", "DATE", "OK", "FAILED", "TOTAL", "STATUS", "WALL", "FOLDER")]
    for r in rows:
        date = r.created[:19].replace("T", " ")
        table.append((r.job, date, str(r.ok), str(r.failed), str(r.total), r.status,
                      duration(r.wall_s), str(r.path)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v)


def show(image: Path) -> str:
    """One image: where it is in its run, its recipe (parameters, model, device), its chain
    (each stage with its content key, its input's and its parameters) and its infotext."""
    text = png.read_text(image)
    if png.RECIPE_CHUNK not in text:
        raise ValueError(f"{image} has no '{png.RECIPE_CHUNK}' chunk: it was not made by "
                         "sdbatch (a grid sheet? its cells are in its 'sdbatch_grid' chunk)")
    data = json.loads(text[png.RECIPE_CHUNK])
    recipe = data["recipe"]
    out = [f"{image}  (image {data.get('index', '?')}, sdbatch {data.get('sdbatch', '?')})"]
    run = image.resolve().parent.parent
    entry = manifest.read(run / "manifest.jsonl").get(data.get("index"))
    if entry is not None:
        timing = entry.get("timings", {}).get("render_s")
        out.append(f"run: {run}  status: {entry.get('status')}"
                   + (f"  render: {timing}s" if timing is not None else ""))
    out.append("recipe:")
    out += [f"  {k}: {_value(v)}" for k, v in recipe["params"].items()]
    model = recipe.get("model", {})
    out.append(f"  model: {model.get('name')} [{model.get('hash')}] {model.get('dtype')}")
    for kind in ("loras", "hypernetworks"):
        for item in model.get(kind) or []:
            out.append(f"    {kind[:-1]}: {' '.join(map(str, item))}")
    device = recipe.get("device", {})
    out.append("  device: " + ", ".join(f"{k} {v}" for k, v in device.items()))
    out.append("chain:")
    for n, stage in enumerate(recipe.get("stages", []), 1):
        source = f" <- {stage['input'][:12]}" if stage.get("input") else ""
        out.append(f"  {n}. {stage['kind']}  key {stage['key'][:12]}{source}")
        params = stage.get("params", {})
        own = {k: v for k, v in params.items() if recipe["params"].get(k, object()) != v}
        out += [f"       {k}: {_value(v)}" for k, v in own.items()]
        if len(own) < len(params):
            out.append("       (the rest as the recipe's)" if own else
                       "       (the recipe's parameters)")
        out += [f"       {k}: {_value(v)}" for k, v in stage.items()
                if k not in ("kind", "key", "input", "params")]
    out.append("infotext:")
    out += [f"  {line}" for line in text.get("parameters", "").splitlines()]
    return "\n".join(out)
