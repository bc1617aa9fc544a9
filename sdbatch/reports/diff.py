"""`sdbatch diff RUN_A RUN_B`: two runs compared image by image, matched by recipe.

Images are matched by what made them, never by file name:

- **same recipe**: equal content keys (the manifest's ``key``: the whole chain of stage
  calls, model files and device type included); their pixels are compared;
- **near match**: of the images left, one of A and one of B with the same seed, paired by
  the fewest differing recipe keys (ties: the same index first, then the lower indices),
  globally, fewest first; the keys that differ are listed with both values;
- **one side only**: what is left (another seed, or nothing left to pair with).

Only images the manifests vouch for (status ok, file there) take part, so a run that is
interrupted or still rendering is compared as far as it went.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdbatch.output import manifest
from sdbatch.output.run_folder import RunFolder, differences
from sdbatch.reports.compare import Distance, distance, heat_map, rgb, stack_rows, strip

ROWS_PER_SHEET = 24  # pairs on one side-by-side sheet; more make sheet-002.png and on
SHEET_PX = 128  # the height of each picture on a sheet (scaled, nearest neighbour)


class DiffError(ValueError):
    """A folder given is not a run folder."""


def comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe as diffed: its render params, model, device, and each post-step's params
    (``stages.N.KIND.KEY``); content keys left out, they follow from the rest."""
    stages = {f"{i}.{s['kind']}": s["params"] for i, s in enumerate(recipe.get("stages", []))
              if not (i == 0 and s["kind"] == "txt2img")}  # the render params themselves
    return {"params": recipe.get("params", {}), "model": recipe.get("model", {}),
            "device": recipe.get("device", {}), "stages": stages}


def value(d: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of ``differences`` (keys may hold dots: stage names do not)."""
    for part in _split(d, dotted):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _split(d: Any, dotted: str) -> list[str]:
    parts, rest = [], dotted
    while rest:
        if isinstance(d, dict):
            match = next((k for k in sorted(d, key=len, reverse=True)
                          if rest == k or rest.startswith(f"{k}.")), None)
            if match is None:
                return [*parts, rest]
            parts.append(match)
            d, rest = d[match], rest[len(match) + 1:]
        else:
            return [*parts, rest]
    return parts


@dataclass
class Pair:
    a: dict[str, Any]
    b: dict[str, Any]
    how: str  # "same recipe" or "near"
    differs: list[str]  # recipe keys that differ
    distance: Distance | None = None
    problem: str | None = None  # why no distance (sizes differ)
    heat: str | None = None

    @property
    def changed(self) -> bool:
        return self.distance is None or not self.distance.same

    def as_dict(self, ra: dict, rb: dict) -> dict[str, Any]:
        return {"a": self.a["file"], "b": self.b["file"], "a_index": self.a["index"],
                "b_index": self.b["index"], "how": self.how, "key_a": self.a.get("key"),
                "key_b": self.b.get("key"),
                "differs": {k: [value(ra, k), value(rb, k)] for k in self.differs},
                "distance": self.distance.as_dict() if self.distance else None,
                "problem": self.problem, "heat": self.heat}


def match(a: list[dict[str, Any]], b: list[dict[str, Any]]
          ) -> tuple[list[Pair], list[dict[str, Any]], list[dict[str, Any]]]:
    """(pairs, A only, B only) of two runs' ok manifest entries (see the module docstring)."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(b, key=lambda e: e["index"]):
        by_key[e["key"]].append(e)
    pairs, left_a = [], []
    for e in sorted(a, key=lambda e: e["index"]):
        same = by_key.get(e["key"])
        if same:
            other = next((o for o in same if o["index"] == e["index"]), same[0])
            same.remove(other)
            pairs.append(Pair(e, other, "same recipe",
                              differences(comparable(e["recipe"]), comparable(other["recipe"]))))
        else:
            left_a.append(e)
    left_b = [e for es in by_key.values() for e in es]
    candidates = []
    for x in left_a:
        for y in left_b:
            if x["seed"] == y["seed"]:
                keys = differences(comparable(x["recipe"]), comparable(y["recipe"]))
                candidates.append((len(keys), x["index"] != y["index"], x["index"], y["index"],
                                   keys))
    taken_a, taken_b = set(), set()
    ea = {e["index"]: e for e in left_a}
    eb = {e["index"]: e for e in left_b}
    for _, _, i, j, keys in sorted(candidates, key=lambda c: c[:4]):
        if i not in taken_a and j not in taken_b:
            taken_a.add(i)
            taken_b.add(j)
            pairs.append(Pair(ea[i], eb[j], "near", keys))
    pairs.sort(key=lambda p: p.a["index"])
    return (pairs, [e for e in left_a if e["index"] not in taken_a],
            sorted((e for e in left_b if e["index"] not in taken_b), key=lambda e: e["index"]))


@dataclass
class Report:
    a: str
    b: str
    job_differs: dict[str, list[Any]]
    counts: tuple[int, int]
    pairs: list[Pair]
    only_a: list[dict[str, Any]]
    only_b: list[dict[str, Any]]
    sheets: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        """Every image of each run has its twin in the other, with equal pixels; two runs
        without images are not the same (a CI diff of two failed runs must not pass)."""
        return bool(self.pairs) and not self.only_a and not self.only_b and all(
            p.how == "same recipe" and not p.changed for p in self.pairs)

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "same": self.same,
                "job_differs": self.job_differs,
                "images": {"a": self.counts[0], "b": self.counts[1]},
                "pairs": [p.as_dict(comparable(p.a["recipe"]), comparable(p.b["recipe"]))
                          for p in self.pairs],
                "only_a": [e["file"] for e in self.only_a],
                "only_b": [e["file"] for e in self.only_b], "sheets": self.sheets}

    def text(self) -> str:
        same = [p for p in self.pairs if p.how == "same recipe"]
        changed = [p for p in same if p.changed]
        near = [p for p in self.pairs if p.how == "near"]
        lines = [f"sdbatch diff {self.a} {self.b}"]
        if self.job_differs:
            lines.append("the jobs differ in: " + ", ".join(
                f"{k} ({_short(v[0])} -> {_short(v[1])})" for k, v in self.job_differs.items()))
        lines.append(f"{self.counts[0]} images in A, {self.counts[1]} in B: {len(same)} of "
                     f"the same recipe ({len(same) - len(changed)} identical, {len(changed)} "
                     f"changed), {len(near)} near matches, {len(self.only_a)} only in A, "
                     f"{len(self.only_b)} only in B")
        if changed:
            lines.append("changed (same recipe, other pixels):")
            lines += [_pair_line(p) for p in changed]
        if near:
            lines.append("near matches (same seed, the recipe keys listed differ):")
            lines += [_pair_line(p) for p in near]
        for side, entries in (("A", self.only_a), ("B", self.only_b)):
            if entries:
                lines.append(f"only in {side}: " + ", ".join(e["file"] for e in entries))
        lines += [f"side by side: {s}" for s in self.sheets]
        if not self.pairs and not self.only_a and not self.only_b:
            lines.append("nothing to compare: neither run has an image")
        lines.append("identical" if self.same else "different")
        return "\n".join(lines) + "\n"


def _short(v: Any, width: int = 40) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return text if len(text) <= width else text[:width - 3] + "..."


def _keys(p: Pair) -> str:
    ra, rb = comparable(p.a["recipe"]), comparable(p.b["recipe"])
    return "; ".join(f"{k}: {_short(value(ra, k))} -> {_short(value(rb, k))}"
                     for k in p.differs)


def _pair_line(p: Pair) -> str:
    keys = _keys(p)
    what = str(p.distance) if p.distance else p.problem
    return (f"  {p.a['file']} <-> {p.b['file']}: {what}" + (f"; {keys}" if keys else "")
            + (f"; heat map {p.heat}" if p.heat else ""))


def entries_there(run: Path) -> list[dict[str, Any]]:
    if not (run / "run.json").exists():
        raise DiffError(f"{run} is not an sdbatch run folder (no run.json)")
    return [e for e in manifest.read(run / "manifest.jsonl").values()
            if e.get("status") == "ok" and (run / e["file"]).exists()]


def diff(run_a: Path, run_b: Path, out: Path) -> Report:
    """Compare two run folders; write report.txt, report.json, heat/ and sheet-NNN.png into
    ``out``."""
    a, b = entries_there(run_a), entries_there(run_b)
    ja, jb = RunFolder.stored_job(run_a) or {}, RunFolder.stored_job(run_b) or {}
    for job in (ja, jb):
        job.pop("run", None)
        job.pop("executor", None)
    job_differs = {k: [value(ja, k), value(jb, k)] for k in differences(ja, jb)}
    pairs, only_a, only_b = match(a, b)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in pairs:
        try:
            x, y = rgb(Image.open(run_a / p.a["file"])), rgb(Image.open(run_b / p.b["file"]))
        except OSError as e:  # cut short, or no picture any more: this pair differs
            p.problem = f"cannot be read as a picture: {e}"
            continue
        if x.shape != y.shape:
            p.problem = (f"sizes differ: {x.shape[1]}x{x.shape[0]} and "
                         f"{y.shape[1]}x{y.shape[0]}")
            panels = [("A", x), ("B", y)]
        else:
            p.distance = distance(x, y)
            heat = heat_map(x, y)
            panels = [("A", x), ("B", y), ("difference", heat)]
            if not p.distance.same:
                p.heat = f"heat/{Path(p.a['file']).stem}--{Path(p.b['file']).stem}.png"
                (out / "heat").mkdir(exist_ok=True)
                Image.fromarray(heat).save(out / p.heat)
        if p.changed or p.how == "near":
            caption = "\n".join(filter(None, [f"A {p.a['file']}  B {p.b['file']}",
                                              str(p.distance) if p.distance else p.problem,
                                              _keys(p)]))
            rows.append(strip(panels, caption, height=SHEET_PX))
    report = Report(str(run_a), str(run_b), job_differs, (len(a), len(b)), pairs, only_a,
                    only_b)
    for n in range(0, len(rows), ROWS_PER_SHEET):
        name = f"sheet-{n // ROWS_PER_SHEET + 1:03d}.png"
        stack_rows(rows[n:n + ROWS_PER_SHEET]).save(out / name)
        report.sheets.append(name)
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2,
                                                ensure_ascii=False), encoding="utf-8")
    (out / "report.txt").write_text(report.text(), encoding="utf-8")
    return report
