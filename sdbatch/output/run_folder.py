"""outputs/<job>/<run>/: the resolved config, the overrides, manifest.jsonl, run.json, images/.

Each image is written atomically and only then gets its manifest line, so at any moment
(kill -9 included) the folder holds whole images and a manifest that vouches only for them.
Re-opening the folder skips every image whose file still has the manifest's sha256; what a
resume must not change (the expanded job, the model files, the device) is in run.json's
`made_of`, compared before any work. One process at a time holds the folder (lock.py), or
the shard tasks of one SLURM submission together: their manifest lines are appended under a
file lock (manifest.py), and each session record is a read-modify-write of run.json under
run.json.lock, so no task's record overwrites another's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import secrets
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from sdbatch import __version__, atomic
from sdbatch.output import manifest

RESUME_IGNORES = ("run", "executor", "grid")  # may change between sessions of one run
# of a stack record: changed only with run.allow_device_change (each changes the rounding)
DEVICE_KEYS = ("device", "dtype", "switches")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_dir(job_name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("outputs") / job_name / stamp
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{stamp}-{n}"), n + 1
    return path


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"sdbatch": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def made_of(job: dict[str, Any], filename: str, stacks: dict[str, dict[str, Any]],
            networks: dict[str, str], inputs: dict[str, str] | None = None,
            max_batch: int = 1) -> dict[str, Any]:
    """What a run's images are made of, as a resume compares it: the expanded job (prompt
    file, styles and combinatorial wildcards written in; without run and executor, and
    without model.dtype, whose effect is the stacks' dtype), the file name pattern, each
    checkpoint's stack record (file hashes, device, dtype), each LoRA's or hypernetwork's
    hash, each input image's (init images, masks) sha256, and executor.max_batch (which
    images share a forward pass, and so their last rounding)."""
    job = {k: v for k, v in job.items() if k not in RESUME_IGNORES
           and not (k == "controlnet" and not v)}  # runs made before units existed resume
    job["model"] = {k: v for k, v in job["model"].items() if k != "dtype"}
    return {"job": job, "filename": filename, "models": stacks, "networks": networks,
            "inputs": inputs or {}, "max_batch": max_batch}


def recorded_max_batch(made: dict[str, Any]) -> int:
    """The executor.max_batch a run's images were rendered with. Runs made before it was
    recorded made passes of params.batch_size."""
    return made.get("max_batch", made["job"]["params"]["batch_size"])


def resume_changes(stored: dict[str, Any], current: dict[str, Any]
                   ) -> tuple[list[str], list[str]]:
    """(what changed in the job or its files, what changed in device or dtype), as dotted
    keys: `params.steps`, `run.filename`, `models.tiny.model`, `models.tiny.device`."""
    changed = [f"job.{k}" for k in differences(stored["job"], current["job"])]
    if stored["filename"] != current["filename"]:
        changed.append("run.filename")
    device = []
    for key in differences(stored["models"], current["models"], "models."):
        (device if key.rsplit(".", 1)[-1] in DEVICE_KEYS else changed).append(key)
    changed += differences(stored["networks"], current["networks"], "networks.")
    changed += [f"input {k.removeprefix('inputs.')} (its file changed)" for k in
                differences(stored.get("inputs", {}), current["inputs"], "inputs.")]
    return [c.removeprefix("job.") for c in changed], device


def record_grids(path: Path, files: list[str]) -> None:
    """Name grid sheets (paths relative to the run folder) in run.json's ``grids``, after
    those already named: a read-modify-write under run.json's lock, like every other (a
    `sdbatch grid` while a run records its session loses neither)."""
    with FileLock(path / "run.json.lock"):
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
        info["grids"] = list(dict.fromkeys([*info.get("grids", []), *files]))
        atomic.write_text(path / "run.json", json.dumps(info, indent=2))


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.images = path / "images"
        self.info: dict[str, Any] = json.loads((path / "run.json").read_text(encoding="utf-8"))
        # what the manifest held when the folder was opened (what a resume skips); lines
        # written since are not kept, so a long run's memory does not grow with its images
        self.done = manifest.read(path / "manifest.jsonl")
        for folder in (path, self.images, path / "grids"):  # run.json, manifest, grids
            atomic.remove_stale_temps(folder)
        self.manifest = manifest.Manifest(path / "manifest.jsonl")

    @staticmethod
    def stored_info(path: Path) -> dict[str, Any]:
        return json.loads((path / "run.json").read_text(encoding="utf-8"))

    @staticmethod
    def stored_entries(path: Path) -> dict[int, dict[str, Any]]:
        return manifest.read(path / "manifest.jsonl")

    @staticmethod
    def started_in(path: Path) -> Path | None:
        """The folder the run was first started in: its job's relative paths (pictures,
        paths.models) are relative to it."""
        try:
            sessions = RunFolder.stored_info(path).get("sessions", [])
        except (OSError, ValueError):
            return None
        return next((Path(s["cwd"]) for s in sessions if s.get("cwd")), None)

    @staticmethod
    def stored_job(path: Path) -> dict[str, Any] | None:
        config = path / "config.yaml"
        return yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else None

    @staticmethod
    def mismatch(path: Path, job: dict[str, Any]) -> list[str]:
        """Keys in which ``job`` differs from the job that made the run folder."""
        stored = RunFolder.stored_job(path) or {}
        strip = lambda d: {k: v for k, v in d.items() if k not in RESUME_IGNORES}  # noqa: E731
        return differences(strip(stored), strip(job))

    @classmethod
    def create(cls, path: Path, job: dict[str, Any], overrides: list[str], nonce: int,
               total: int, made: dict[str, Any]) -> RunFolder:
        (path / "images").mkdir(parents=True, exist_ok=True)
        atomic.write_text(path / "config.yaml", yaml.safe_dump(job, sort_keys=False,
                                                               allow_unicode=True))
        atomic.write_text(path / "overrides.yaml", yaml.safe_dump(overrides))
        info = {"seed_nonce": nonce, "images": total, "created": now(), "made_of": made,
                "sessions": []}
        atomic.write_text(path / "run.json", json.dumps(info, indent=2))
        return cls(path)

    @staticmethod
    def new_nonce() -> int:
        return secrets.randbits(62)

    def is_done(self, index: int, keys: set[str]) -> bool:
        """Whether image ``index`` is there, whole, made with one of ``keys``."""
        entry = self.done.get(index)
        if not entry or entry.get("status") != "ok" or entry.get("key") not in keys:
            return False
        file = self.path / entry["file"]
        return file.exists() and sha256_file(file) == entry["sha256"]

    def write_image(self, name: str, data: bytes, entry: dict[str, Any]) -> None:
        atomic.write_bytes(self.images / name, data)
        entry = {**entry, "file": f"images/{name}", "sha256": hashlib.sha256(data).hexdigest(),
                 "status": "ok"}
        self.manifest.append(entry)

    def write_failure(self, entry: dict[str, Any], error: str) -> None:
        entry = {**entry, "status": "failed", "error": error}
        self.manifest.append(entry)

    def _update(self, change) -> None:
        """run.json read afresh, changed by ``change(info)`` and replaced, under its lock."""
        with FileLock(self.path / "run.json.lock"):
            info = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
            change(info)
            atomic.write_text(self.path / "run.json", json.dumps(info, indent=2))
        self.info = info

    def add_session(self, session: dict[str, Any], top: tuple[str, ...]) -> None:
        """Append ``session`` to run.json's sessions, its ``top`` keys also at the top (what
        the run as a whole is doing); later updates go to this session."""
        def change(info: dict[str, Any]) -> None:
            info["sessions"].append(session)
            self._session = len(info["sessions"]) - 1  # records are only ever appended
            info.update({k: session[k] for k in top})
        self._update(change)

    def update_session(self, changes: dict[str, Any], top: bool = True) -> None:
        def change(info: dict[str, Any]) -> None:
            info["sessions"][self._session].update(changes)
            if top:
                info.update(changes)
        self._update(change)

    def start_session(self, machine: dict[str, Any], stacks: dict[str, str],
                      argv: list[str], shard: dict[str, Any] | None = None) -> None:
        """``machine``: device, device_name, dtype, threads; ``stacks``: checkpoint ->
        stack identity, so a later session allowed on another device keeps these images.
        ``shard``: a SLURM array task's record (submission, shard); its session leaves the
        run's own status to the driver."""
        session = {"started": now(), **machine, "stacks": stacks, "argv": argv,
                   "cwd": str(Path.cwd()), "versions": versions(), "status": "running",
                   **(shard or {})}
        self.add_session(session, () if shard else ("started", *machine, "versions",
                                                    "status"))

    def finish_session(self, status: str, counts: dict[str, int], top: bool = True) -> None:
        self.manifest.compact()
        self.update_session({"ended": now(), "status": status, "counts": counts}, top)
