"""The command line: `python -m sdbatch +job=NAME [overrides]` (Hydra) and the subcommands
`sdbatch resume RUN_DIR`, `sdbatch reproduce IMAGE.png`, `sdbatch verify RUN_DIR`,
`sdbatch diff RUN_A RUN_B`, `sdbatch grid RUN_DIR`, `sdbatch gallery RUN_DIR`, `sdbatch ls`,
`sdbatch show IMAGE.png` and `sdbatch bench`.

A job is validated before torch or diffusers is imported (seconds on a small machine), so a
mistake is reported at once. Mistakes Hydra would report in its own words (a job file that is
not YAML, an override it cannot parse, a key it does not know) are caught here first and read
like the schema's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from sdbatch import schema
from sdbatch.schema import Job, JobError, Origin

USAGE = """usage:
  sdbatch +job=NAME [key=value ...]     run jobs/NAME.yaml (Hydra overrides after it)
  sdbatch run key=value ...             a job of overrides alone, no job file
  sdbatch resume RUN_DIR                finish a stopped run from its own saved config
         [--executor local]             ... on another executor (its keys at their defaults)
  sdbatch reproduce IMAGE.png           render an image again from its recipe, compare bytes
  sdbatch grid RUN_DIR [--x K --y K --z K]  write X/Y/Z plot sheets of a run into grids/
  sdbatch gallery RUN_DIR               (re)write RUN_DIR/index.html from what is there now
  sdbatch ls [FOLDER]                   the runs under FOLDER (outputs/): job, date, counts
  sdbatch show IMAGE.png                one image's recipe, chain and infotext
  sdbatch verify RUN_DIR [--sample N]   render a run's images again, name those that moved
  sdbatch diff RUN_A RUN_B              compare two runs image by image, matched by recipe
  sdbatch bench [--model sd15 ...]      steps/s, images/s, peak memory next to diffusers
"""


PRINTS_ONLY = ("ls", "show", "grid", "gallery")  # commands a closed pipe may stop quietly


def store_schema_defaults() -> None:
    """Give Hydra every key with its schema default, so `params.cfg_scale=[5,7]` overrides a
    key the job never mentioned. A plain node, not a structured one: the schema's own
    validator reports every problem at once, where Hydra would stop at the first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sdbatch_defaults",
                                 node=OmegaConf.create(schema.to_dict(schema.Job())))


def fail(error: Exception | str, code: int = 2) -> None:
    print(f"sdbatch: {error}", file=sys.stderr)
    sys.exit(code)


def run_job(job: Job, origin: Origin, overrides: list[str]) -> int:
    """Run a validated job. The model code (torch, diffusers) is imported only now, after
    executor=multi's workers start: they import their own meanwhile."""
    from sdbatch.executors.processes import early

    with early(job.executor) as started:
        from sdbatch.executors import PoolError
        from sdbatch.models.stack import StackLoadError
        from sdbatch.output.writer import WriteError
        from sdbatch.run import run

        try:
            return run(job, origin, overrides, sys.argv, started=started)
        except (JobError, StackLoadError, WriteError, PoolError) as e:
            fail(e)
        except KeyboardInterrupt:  # before the run's own Ctrl-C handling took over
            fail("stopped (Ctrl-C); a run folder named above is finished by `sdbatch resume` "
                 "with it", code=130)
    return 2


# overrides of keys the schema does not know, as the user wrote them, by the `++` form given
# to Hydra: Hydra composes them (instead of stopping at the first) and the schema reports them
_TYPED: dict[str, str] = {}


def check_command_line(args: list[str]) -> list[str]:
    """The overrides of ``args`` checked before Hydra sees them: exits 2 with one line for an
    override Hydra cannot parse or a job file that is not YAML; returns ``args`` with each
    override of an unknown key turned into a force-add, for the schema to report."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    out = list(args)
    for text in get_args_parser().parse_args(args).overrides:
        if "=" not in text and Path(text).suffix.lower() in (".yaml", ".yml"):
            fail(f"'{text}': a job is given by its name, +job={Path(text).stem} (looked up in "
                 "jobs/ of this folder and in SDBATCH_JOBS), not by its path")
        try:
            [override] = parser.parse_overrides([text])
        except OverrideParseException as e:
            reason = str(e).splitlines()[0]
            examples = (('"params.seed=[1,2]"', '"prompt=\'a cat\'"') if sys.platform == "win32"
                        else ("'params.seed=[1,2]'", "'prompt=\"a cat\"'"))  # cmd: "" only
            fail(f"command line '{text}': not a valid override ({reason}); write a list as "
                 f"{examples[0]} and quote a value with spaces: {examples[1]}")
        key = override.key_or_group
        if key == "job":
            check_job_file(override.value())
        elif (override.type == OverrideType.CHANGE and override.package is None
              and not key.startswith("hydra") and not schema.knows(key)):
            typed = f"++{text}"
            _TYPED[typed] = text
            out[out.index(text)] = typed
    return out


def check_job_file(name: str) -> None:
    """`+job=NAME` names a file in a job folder that YAML can read, or exit 2 saying why."""
    from sdbatch.job_folders import job_dirs
    from sdbatch.provenance import shown
    from sdbatch.text_files import TextFileError, read_text

    folders = job_dirs()
    file = next((f / f"{name}.yaml" for f in folders if (f / f"{name}.yaml").is_file()), None)
    if file is None:
        known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})
        listing = f"; jobs there: {', '.join(known)}" if known else ""
        named = (f"; a job is named without .yaml: +job={name[:-5]}"
                 if name.lower().endswith(".yaml") else "")
        fail(f"+job={name}: no {name}.yaml in {', '.join(shown(f) for f in folders)} (add "
             f"folders with SDBATCH_JOBS){named}{listing}")
    try:
        text = read_text(file)
        yaml.load(text, Loader=_UniqueKeys)
    except TextFileError as e:
        fail(str(e))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{shown(file)}:{mark.line + 1}:{mark.column + 1}" if mark else shown(file)
        context = ""
        if e.context and e.context_mark:
            context = (f" ({e.context} at line {e.context_mark.line + 1}, column "
                       f"{e.context_mark.column + 1})")
        hint = (" (a backslash in double quotes starts an escape: write a Windows path in "
                "single quotes or with /)" if "escape" in str(e.problem) else
                " (indent with spaces: YAML takes no tabs)" if "'\\t'" in str(e.problem)
                else "")
        fail(f"{where}: not valid YAML: {e.problem}{context}{hint}")
    except yaml.YAMLError as e:
        fail(f"{shown(file)}: not valid YAML: {e}")
    if (problem := package_header_problem(text)) is not None:
        fail(f"{shown(file)}: {problem}")


def package_header_problem(text: str) -> str | None:
    """Why Hydra would not read the job's `# @package _global_` header, or None. Hydra reads
    `# @key value` lines only at the top of a file, before any other line (a comment too);
    without it every key of the job lands under `job.` and is unknown."""
    import re

    lines = text.splitlines()
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if not re.match(r"#\s*@", line):
            break
        if re.fullmatch(r"#\s*@package\s+_global_", line):
            return None
    at = next((i for i, line in enumerate(lines, 1)
               if re.fullmatch(r"\s*#\s*@package\s+_global_\s*", line)), None)
    if at is not None:
        return (f"its `# @package _global_` header is on line {at}, after other lines; Hydra "
                "reads it only at the top: move it to the first line")
    return ("it has no `# @package _global_` header; make that the first line (without it "
            "every key of the job is read as a key of `job`)")


class _UniqueKeys(yaml.SafeLoader):
    """YAML as Hydra reads it: a key given twice in one mapping is an error (it names the
    line), not the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' is given twice (first on line "
                    f"{seen[key] + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


@hydra.main(config_path="pkg://sdbatch.conf", config_name="config", version_base=None)
def hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sdbatch.provenance import Origins

    hc = HydraConfig.get()
    overrides = [_TYPED.get(o, o) for o in hc.overrides.task]
    origin = Origins(overrides, dict(hc.runtime.choices))
    try:
        job = schema.validate(OmegaConf.to_container(cfg, resolve=True), origin)
    except JobError as e:
        fail(e)
    code = run_job(job, origin, overrides)
    if code:
        sys.exit(code)


def resume(args: list[str]) -> None:
    from sdbatch.output.run_folder import RunFolder, recorded_max_batch

    parser = argparse.ArgumentParser(prog="sdbatch resume")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--progress", choices=("bar", "steps", "quiet"))
    parser.add_argument("--executor", choices=schema.EXECUTORS,
                        help="finish on this executor (e.g. local after a SLURM array)")
    ns = parser.parse_args(args)
    stored = RunFolder.stored_job(ns.run_dir)
    if stored is None:
        fail(f"{ns.run_dir} is not an sdbatch run folder (no config.yaml)")
    ns.run_dir = from_start_folder(ns.run_dir)
    stored["run"]["dir"] = str(ns.run_dir)
    info = RunFolder.stored_info(ns.run_dir) if (ns.run_dir / "run.json").exists() else {}
    if "made_of" in info:  # the passes its images were made in, whatever the defaults now
        stored.setdefault("executor", {})["max_batch"] = recorded_max_batch(info["made_of"])
    if ns.executor and ns.executor != stored["executor"]["name"]:
        stored["executor"] = schema.on_executor(stored["executor"], ns.executor)
    if ns.progress:
        stored["run"]["progress"] = ns.progress
    label = f"{ns.run_dir / 'config.yaml'}"
    try:
        job = schema.validate(stored, lambda key: label)
    except JobError as e:
        fail(e)
    sys.exit(run_job(job, lambda key: label, []))


def from_start_folder(run_dir: Path) -> Path:
    """Work from the folder the run was started in, where its job's relative paths point
    (a resume from elsewhere found no mask); the run folder's path, made absolute. A run
    folder moved to another machine stays here."""
    from sdbatch.output.run_folder import RunFolder

    run_dir = run_dir.resolve()
    started = RunFolder.started_in(run_dir)
    if started is not None and started.is_dir() and started.resolve() != Path.cwd().resolve():
        print(f"sdbatch: working in {started}, where the run was started", file=sys.stderr)
        os.chdir(started)
    return run_dir


def reproduce(args: list[str]) -> None:
    from sdbatch.reproduce import reproduce as check

    parser = argparse.ArgumentParser(prog="sdbatch reproduce")
    parser.add_argument("image", type=Path)
    parser.add_argument("--out", type=Path, help="also save the new render here")
    ns = parser.parse_args(args)
    from sdbatch.models.stack import StackLoadError

    try:
        same = check(ns.image, ns.out)
    except (JobError, ValueError, OSError, StackLoadError) as e:
        fail(e)
    sys.exit(0 if same else 1)


def bench(args: list[str]) -> None:
    from sdbatch.bench import main as measure

    measure(args)


def report_folder(out: Path | None, prefix: str) -> Path:
    import tempfile

    return out if out is not None else Path(tempfile.mkdtemp(prefix=prefix))


def finish_report(text: str, out: Path, holds: bool) -> None:
    """Print a verify / diff report and where its files are; exit 0 when it holds, else 1."""
    print(text, end="")
    print(f"report: {out / 'report.txt'} and report.json")
    sys.exit(0 if holds else 1)


def verify(args: list[str]) -> None:
    """Exit 0: every image checked holds; 1: some moved (named); 2: nothing could be checked."""
    from sdbatch.models.stack import StackLoadError
    from sdbatch.reports import verify as checks

    parser = argparse.ArgumentParser(prog="sdbatch verify")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sample", type=int, metavar="N",
                        help="check N images, chosen by seed, instead of all")
    parser.add_argument("--tolerance", default=str(checks.Tolerance()),
                        help="where pixels cannot be equal: psnr=DB,ssim=VALUE "
                             "(default %(default)s)")
    parser.add_argument("--out", type=Path, help="the report folder (default: a new temp one)")
    ns = parser.parse_args(args)
    if ns.sample is not None and ns.sample < 1:
        fail(f"--sample {ns.sample}: give at least 1 image (or leave it out to check all)")
    try:
        tolerance = checks.parse_tolerance(ns.tolerance)
        out = report_folder(ns.out and ns.out.resolve(), "sdbatch-verify-report-")
        report = checks.verify(from_start_folder(ns.run_dir), out, ns.sample, tolerance)
    except (checks.VerifyError, JobError, StackLoadError, ValueError, OSError) as e:
        fail(e)
    finish_report(report.text(), out, report.ok)


def diff(args: list[str]) -> None:
    """Exit 0: the same images; 1: they differ (listed); 2: a folder is not a run."""
    from sdbatch.reports import diff as diffs

    parser = argparse.ArgumentParser(prog="sdbatch diff")
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, help="the report folder (default: a new temp one)")
    ns = parser.parse_args(args)
    try:
        out = report_folder(ns.out, "sdbatch-diff-")
        report = diffs.diff(ns.run_a, ns.run_b, out)
    except (diffs.DiffError, OSError) as e:
        fail(e)
    finish_report(report.text(), out, report.same)
def grid(args: list[str]) -> None:
    from sdbatch.reports import grids

    parser = argparse.ArgumentParser(prog="sdbatch grid")
    parser.add_argument("run_dir", type=Path)
    for axis in ("x", "y", "z"):
        parser.add_argument(f"--{axis}", help=f"the {axis} axis: a key given as a list "
                            "(cfg_scale, prompt, post.0.hires_fix.denoise) or batch")
    parser.add_argument("--max-megapixels", type=float, help="each sheet's pixel budget")
    ns = parser.parse_args(args)
    if not (ns.run_dir / "run.json").is_file():
        fail(f"{ns.run_dir} is not an sdbatch run folder (no run.json)")
    if ns.max_megapixels is not None and not ns.max_megapixels > 0:
        fail(f"--max-megapixels {ns.max_megapixels:g}: give a budget above 0 (e.g. 16)")
    try:
        written = grids.write_all(ns.run_dir, ns.x, ns.y, ns.z, ns.max_megapixels)
    except (JobError, OSError, ValueError) as e:  # OSError: an image that cannot be read
        fail(e)
    print("\n".join(map(str, written)) or f"{ns.run_dir}: one image, no grid")


def ls(args: list[str]) -> None:
    from sdbatch.reports import listing

    parser = argparse.ArgumentParser(prog="sdbatch ls")
    parser.add_argument("folder", type=Path, nargs="?", default=Path("outputs"))
    ns = parser.parse_args(args)
    if ns.folder.is_file() and ns.folder.name == "run.json":
        ns.folder = ns.folder.parent
    if not ns.folder.is_dir():
        fail(f"{ns.folder}: no such folder; give the folder of your runs or one run: "
             "sdbatch ls FOLDER")
    print(listing.ls(ns.folder))


def show(args: list[str]) -> None:
    from sdbatch.reports import listing

    parser = argparse.ArgumentParser(prog="sdbatch show")
    parser.add_argument("image", type=Path)
    ns = parser.parse_args(args)
    try:
        text = listing.show(ns.image)
    except (OSError, ValueError) as e:
        fail(e)
    print(text)


def gallery(args: list[str]) -> None:
    from sdbatch.reports import gallery as page

    parser = argparse.ArgumentParser(prog="sdbatch gallery")
    parser.add_argument("run_dir", type=Path)
    ns = parser.parse_args(args)
    try:
        print(page.write(ns.run_dir))
    except FileNotFoundError as e:
        fail(e)


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a prompt or path the console's code page
        if hasattr(stream, "reconfigure"):  # lacks (Windows, output redirected) is escaped
            stream.reconfigure(errors="backslashreplace")
    args = sys.argv[1:]
    commands = {"resume": resume, "reproduce": reproduce, "verify": verify, "diff": diff,
                "bench": bench, "grid": grid, "ls": ls, "show": show, "gallery": gallery}
    if args and args[0] in commands:
        try:
            commands[args[0]](args[1:])
        except BrokenPipeError:
            if args[0] not in PRINTS_ONLY:  # a run, a check: its exit code must say so
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)  # `sdbatch show IMG | head`: the reader has what it wanted
    elif args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
    elif not args:  # a first try, not a render of the defaults' empty prompt
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    else:
        from sdbatch.job_folders import register

        if args and args[0] == "run":
            del sys.argv[1]
        sys.argv[1:] = check_command_line(sys.argv[1:])
        register()
        store_schema_defaults()
        hydra_entry()
