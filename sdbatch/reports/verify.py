"""`sdbatch verify RUN`: render a run's images again and say which ones moved.

The images checked are those the manifest vouches for (status ok) and whose files are there,
so a run that is interrupted, or still rendering, is verified as far as it went. They are
rendered again in one pass of the run's own plan, restricted to them (whole batches, as the
run drew them: an image changes by a level with its batch mates), in a scratch folder.

Each image is then compared with its file, on pixels (decoded RGB): the PNG also embeds the
sdbatch version and the machine that drew it, which a release may change without changing a
picture. Where the image was drawn on this device (type and name), dtype and torch thread
count, with the same torch, diffusers, transformers and sdbatch, the pixels must be equal;
elsewhere kernels round differently, and PSNR and SSIM must reach the tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdbatch.output import manifest, png
from sdbatch.reports.compare import Distance, distance, heat_map, rgb, strip

VERSION_KEYS = ("sdbatch", "torch", "diffusers", "transformers")  # those that move pixels


@dataclass(frozen=True)
class Tolerance:
    """What a render on another machine must reach: both bounds hold."""

    # 40 dB: an RMS difference of 2.5 levels of 255, `sdbatch reproduce`'s bound across
    # devices; CFG 7 -> 8 on tiny (64 px, 2 steps) gives 31-36 dB and SSIM 0.95-0.99
    psnr: float = 40.0
    ssim: float = 0.98

    def holds(self, d: Distance) -> bool:
        return d.psnr >= self.psnr and d.ssim >= self.ssim

    def __str__(self) -> str:
        return f"psnr={self.psnr:g},ssim={self.ssim:g}"


def parse_tolerance(text: str) -> Tolerance:
    """'psnr=30', 'ssim=0.9' or 'psnr=30,ssim=0.9'; a bound not given keeps its default."""
    given: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if name not in ("psnr", "ssim") or math.isnan(number):
            raise ValueError(f"--tolerance {text}: write it as psnr=DB,ssim=VALUE "
                             "(e.g. psnr=40,ssim=0.98; either alone keeps the other's default)")
        given[name] = number
    if not -1 <= given.get("ssim", 0) <= 1:
        raise ValueError(f"--tolerance {text}: SSIM lies between -1 and 1")
    return dataclasses.replace(Tolerance(), **given)


def choose(entries: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """All entries, or ``n`` of them chosen by seed: ranked by the sha256 of 'seed:index' (the
    index breaks ties between images of one seed), so the same run gives the same sample on
    every machine and a sample spreads over the grid, not its first rows."""
    if n is None or n >= len(entries):
        return sorted(entries, key=lambda e: e["index"])
    rank = lambda e: hashlib.sha256(f"{e['seed']}:{e['index']}".encode()).hexdigest()  # noqa: E731
    return sorted(sorted(entries, key=rank)[:n], key=lambda e: e["index"])


def not_exact(recorded: dict[str, Any], drawn: dict[str, Any], dtype_then: str, dtype_now: str,
              versions_then: list[dict[str, str]], versions_now: dict[str, str]) -> list[str]:
    """Why this image cannot be compared byte for byte (empty: it can): what differs between
    where it was drawn (its recipe's device record, the run's sessions' versions) and here."""
    why = []
    for key, words in (("device", "device"), ("device_name", "device name"),
                       ("threads", "torch threads")):
        if recorded.get(key) != drawn.get(key):
            why.append(f"{words} {recorded.get(key)} then, {drawn.get(key)} now")
    if dtype_then != dtype_now:
        why.append(f"dtype {dtype_then} then, {dtype_now} now")
    for key in VERSION_KEYS:
        then = sorted({v.get(key) for v in versions_then if v.get(key)})
        if then and then != [versions_now.get(key)]:
            why.append(f"{key} {' / '.join(then)} then, {versions_now.get(key)} now")
    return why


@dataclass
class Check:
    index: int
    file: str
    mode: str = "exact"  # or "tolerance"
    why_tolerance: list[str] = field(default_factory=list)
    distance: Distance | None = None
    bytes_same: bool | None = None
    key_same: bool | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    heat: str | None = None  # the difference strip, relative to the report folder

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "file": self.file, "ok": self.ok, "mode": self.mode,
                "why_tolerance": self.why_tolerance,
                "distance": self.distance.as_dict() if self.distance else None,
                "bytes_same": self.bytes_same, "key_same": self.key_same,
                "problems": self.problems, "notes": self.notes, "heat": self.heat}

    def line(self) -> str:
        head = f"{'ok  ' if self.ok else 'FAIL'} {self.index:05d} {self.file}: {self.mode}"
        if self.distance is not None:
            head += (": pixels equal" if self.distance.same else f": {self.distance}")
            if self.bytes_same is not None and self.distance.same:
                head += " (bytes equal)" if self.bytes_same else " (metadata differs)"
        out = [head]
        if self.why_tolerance:
            out.append(f"       tolerance because: {'; '.join(self.why_tolerance)}")
        out += [f"       {p}" for p in self.problems]
        out += [f"       note: {n}" for n in self.notes]
        if self.heat:
            out.append(f"       difference: {self.heat}")
        return "\n".join(out)


@dataclass
class Report:
    run: str
    status: str
    total: int  # images the job makes
    there: int  # images the manifest vouches for
    sample: int | None
    tolerance: Tolerance
    machine: dict[str, Any]
    versions: dict[str, str]
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "status": self.status, "images": self.total,
                "there": self.there, "checked": len(self.checks), "sample": self.sample,
                "tolerance": dataclasses.asdict(self.tolerance), "machine": self.machine,
                "versions": self.versions, "notes": self.notes, "ok": self.ok,
                "regressions": [c.index for c in self.checks if not c.ok],
                "checks": [c.as_dict() for c in self.checks]}

    def text(self) -> str:
        bad = [c for c in self.checks if not c.ok]
        lines = [f"sdbatch verify {self.run} ({self.status}: {self.there} of {self.total} "
                 f"images there, {len(self.checks)} checked"
                 + (f", a sample of {self.sample} chosen by seed" if self.sample else "") + ")",
                 f"here: {self.machine.get('device')} ({self.machine.get('device_name')}), "
                 f"{self.machine.get('threads')} torch threads, "
                 + ", ".join(f"{k} {self.versions.get(k)}" for k in VERSION_KEYS),
                 f"tolerance (where pixels cannot be equal): {self.tolerance}"]
        lines += [f"note: {n}" for n in self.notes]
        lines += [c.line() for c in self.checks]
        lines.append(f"{'verified' if self.ok else 'REGRESSIONS'}: {len(self.checks) - len(bad)}"
                     f" of {len(self.checks)} hold"
                     + (f"; {len(bad)} moved: " + ", ".join(f"{c.index:05d} ({c.file})"
                                                           for c in bad) if bad else ""))
        return "\n".join(lines) + "\n"


class VerifyError(ValueError):
    """The folder cannot be verified (not a run folder, nothing there); nothing was rendered."""


def images_there(run: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(every manifest entry, the ok ones): the images the run vouches for."""
    if not (run / "run.json").exists() or not (run / "config.yaml").exists():
        raise VerifyError(f"{run} is not an sdbatch run folder (no run.json or config.yaml)")
    entries = manifest.read(run / "manifest.jsonl")
    ok = [e for e in entries.values() if e.get("status") == "ok"]
    if not ok:
        raise VerifyError(f"{run} has no rendered image to verify yet (manifest.jsonl "
                          "vouches for none)")
    return entries, ok


def verify(run: Path, out: Path, sample: int | None = None,
           tolerance: Tolerance | None = None) -> Report:
    """Render again the images of ``run`` (or a ``sample`` of them), compare, and write
    report.txt, report.json, rendered/ and diffs/ into ``out``."""
    import torch

    from sdbatch.output.run_folder import RunFolder, sha256_file, versions

    tolerance = tolerance or Tolerance()
    entries, ok = images_there(run)
    info = RunFolder.stored_info(run)
    chosen = choose(ok, sample)
    checks = {e["index"]: Check(e["index"], e["file"]) for e in chosen}
    present, intact = {}, set()
    for e in chosen:
        file = run / e["file"]
        if not file.exists():
            checks[e["index"]].problems.append(f"{e['file']} is missing (the manifest "
                                               "says it was written)")
        elif sha256_file(file) != e["sha256"]:
            checks[e["index"]].problems.append(f"{e['file']} changed since the run wrote it "
                                               "(its sha256 is not the manifest's)")
            present[e["index"]] = e
        else:
            present[e["index"]] = e
            intact.add(e["index"])
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if info.get("status") != "complete":
        notes.append(f"the run is {info.get('status', 'unfinished')}: verifying the "
                     f"{len(ok)} images there of {info.get('images', '?')}")
    threads = Counter(e["recipe"].get("device", {}).get("threads") for e in present.values())
    previous = torch.get_num_threads()
    count = threads.most_common(1)[0][0] if threads else None
    if count:
        torch.set_num_threads(count)
    try:
        fresh = _render(run, present, intact, ok, out / "rendered") if present else {}
    finally:
        torch.set_num_threads(previous)
    here = next((f.machine for f in fresh.values()), {})
    now = versions()
    then = [s["versions"] for s in info.get("sessions", []) if "versions" in s]
    for index, e in present.items():
        _compare(run, e, fresh.get(index), checks[index], then, now, tolerance, out)
    report = Report(str(run), info.get("status", "unknown"), info.get("images", len(entries)),
                    len(ok), sample, tolerance, here, now,
                    [checks[e["index"]] for e in chosen], notes)
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
    (out / "report.txt").write_text(report.text(), encoding="utf-8")
    return report


@dataclass
class Fresh:
    image: Image.Image | None
    data: bytes | None
    key: str | None
    machine: dict[str, Any]
    dtype: str
    error: str | None = None


def _render(run: Path, present: dict[int, dict[str, Any]], intact: set[int],
            ok: list[dict[str, Any]], folder: Path) -> dict[int, Fresh]:
    """The images of ``present`` rendered again by the run's plan, each with its PNG; the
    job comes from an ``intact`` image's recipe first (a changed one may be cut short or
    stripped of its chunks)."""
    from sdbatch import schema
    from sdbatch.executors.driver import drive
    from sdbatch.executors.intermediates import ControlMaps, Intermediates
    from sdbatch.executors.local import LocalPool
    from sdbatch.executors.worker import Worker
    from sdbatch.models import stack as stacks
    from sdbatch.output import records
    from sdbatch.output.run_folder import RunFolder
    from sdbatch.plan import finals, needed
    from sdbatch.run import prepare, setup

    embedded, first = None, None
    for e in sorted(present.values(), key=lambda e: e["index"] not in intact):
        try:  # seed-resolved, prompt files written in
            first = run / e["file"]
            embedded = png.read_recipe(first)["job"]
            break
        except (OSError, ValueError):
            continue
    if embedded is None:
        raise ValueError(f"no image of {run} holds its sdbatch recipe any more (changed or "
                         "re-saved without it): nothing says how to render them again")
    config = RunFolder.stored_job(run)
    raw = json.loads(json.dumps(embedded))
    # the prompts as rendered: a random dynamic prompt is not drawn again (see reproduce)
    picked = {e["index"]: (e["recipe"]["params"]["prompt"],
                           e["recipe"]["params"]["negative_prompt"]) for e in ok}
    if raw["dynamic_prompts"]["mode"] == "random":
        raw["dynamic_prompts"]["mode"] = "off"
    scratch = Path(tempfile.mkdtemp(prefix="sdbatch-verify-"))
    label = f"the job in {first} and {run / 'config.yaml'}"
    try:
        raw["run"] = {**config["run"], "dir": str(scratch / "run"), "progress": "quiet"}
        # the bytes do not depend on the executor
        raw["executor"] = schema.on_executor(config["executor"], "local")
        job = schema.validate(raw, lambda key: label)
        p = prepare(job, lambda key: label, picked)
        wanted = set(present)
        batches = needed(p.plan, {r.index for r in p.renders} - wanted, lambda key: False)
        store = Intermediates(scratch, int(job.executor.intermediate_cache_gb * 2**30))
        made = {k: v for e in ok for k, v in records.oom_retries(e["recipe"]).items()}
        pool = LocalPool(Worker(dataclasses.replace(setup(p, job), oom_retries=made),
                                stacks.pick_device(job.executor.device)))
        finishes = finals(p.plan)
        by_index = {r.index: r for r in p.renders}
        found: dict[int, Fresh] = {}
        folder.mkdir(parents=True, exist_ok=True)
        print(f"verify: rendering {len(wanted)} image{'s' if len(wanted) != 1 else ''} of "
              f"{run} again ({len(batches)} batches)")
        try:
            for result in drive(batches, pool, store, ControlMaps(scratch)):
                for i, call in enumerate(result.batch.calls):
                    for index in finishes.get(call.key, ()):
                        if index not in wanted:
                            continue
                        r, spec = by_index[index], p.specs[by_index[index].checkpoint]
                        machine = result.machine or stacks.machine(spec.torch_device)
                        if result.error:
                            found[index] = Fresh(None, None, call.key, machine,
                                                 spec.record["dtype"], result.error)
                            continue
                        picture, chain = result.pictures[i], p.plan.chains[index]
                        data = png.encode(picture.image, records.infotext(r, p.specs, chain),
                                          records.png_recipe(r, spec, chain, embedded,
                                                             picture.chain_found, machine))
                        (folder / Path(present[index]["file"]).name).write_bytes(data)
                        found[index] = Fresh(picture.image, data, p.plan.key(index), machine,
                                             spec.record["dtype"])
        finally:
            pool.close()
        return found
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare(run: Path, entry: dict[str, Any], fresh: Fresh | None, check: Check,
             then: list[dict[str, str]], now: dict[str, str], tolerance: Tolerance,
             out: Path) -> None:
    if fresh is None:
        check.problems.append("it was not rendered again (it is no longer in its job)")
        return
    if fresh.error:
        check.problems.append(f"the render failed: {fresh.error.splitlines()[0]}")
        return
    recipe = entry["recipe"]
    check.why_tolerance = not_exact(recipe.get("device", {}), fresh.machine,
                                    recipe["model"]["dtype"], fresh.dtype, then, now)
    check.mode = "tolerance" if check.why_tolerance else "exact"
    check.key_same = fresh.key == entry["key"]
    if not check.key_same:
        check.notes.append(f"its recipe now has another content key ({entry['key']} then, "
                              f"{fresh.key} now): the job, a model file or sdbatch's keying "
                              "changed")
    try:
        old = rgb(Image.open(run / entry["file"]))
    except OSError as e:  # cut short or not a picture any more: a regression, named
        check.problems.append(f"{entry['file']} cannot be read as a picture: {e}")
        return
    new = rgb(fresh.image)
    check.bytes_same = (run / entry["file"]).read_bytes() == fresh.data
    if old.shape != new.shape:
        check.problems.append(f"sizes differ: {old.shape[1]}x{old.shape[0]} then, "
                              f"{new.shape[1]}x{new.shape[0]} now")
        return
    d = check.distance = distance(old, new)
    if check.mode == "exact" and not d.same:
        check.problems.append("the pixels differ where they must be equal")
    elif check.mode == "tolerance" and not tolerance.holds(d):
        check.problems.append(f"outside the tolerance ({tolerance})")
    if not d.same:
        name = f"diffs/{Path(entry['file']).stem}.png"
        (out / "diffs").mkdir(exist_ok=True)
        strip([("recorded", old), ("rendered again", new), ("difference", heat_map(old, new))],
              str(d)).save(out / name)
        check.heat = name
