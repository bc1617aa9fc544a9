"""The command line: `python -m sdbatch +job=NAME [overrides]` (Hydra) and the subcommands
`sdbatch resume RUN_DIR` and `sdbatch reproduce IMAGE.png`."""

from __future__ import annotations

import argparse
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from sdbatch import schema
from sdbatch.models.stack import StackLoadError
from sdbatch.output.writer import WriteError
from sdbatch.schema import JobError

USAGE = """usage:
  sdbatch +job=NAME [key=value ...]     run jobs/NAME.yaml (Hydra overrides after it)
  sdbatch resume RUN_DIR                finish a stopped run from its own saved config
  sdbatch reproduce IMAGE.png           render an image again from its recipe, compare bytes
"""


def store_schema_defaults() -> None:
    """Give Hydra every key with its schema default, so `params.cfg_scale=[5,7]` overrides a
    key the job never mentioned. A plain node, not a structured one: the schema's own
    validator reports every problem at once, where Hydra would stop at the first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sdbatch_defaults",
                                 node=OmegaConf.create(schema.to_dict(schema.Job())))


def fail(error: Exception, code: int = 2) -> None:
    print(f"sdbatch: {error}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="pkg://sdbatch.conf", config_name="config", version_base=None)
def hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sdbatch.provenance import Origins
    from sdbatch.run import run

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    origin = Origins(overrides, dict(hc.runtime.choices))
    try:
        job = schema.validate(OmegaConf.to_container(cfg, resolve=True), origin)
        code = run(job, origin, overrides, sys.argv)
    except (JobError, StackLoadError, WriteError) as e:
        fail(e)
    if code:
        sys.exit(code)


def resume(args: list[str]) -> None:
    from pathlib import Path

    from sdbatch.output.run_folder import RunFolder
    from sdbatch.run import run

    parser = argparse.ArgumentParser(prog="sdbatch resume")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--progress", choices=("bar", "steps", "quiet"))
    ns = parser.parse_args(args)
    stored = RunFolder.stored_job(ns.run_dir)
    if stored is None:
        fail(f"{ns.run_dir} is not an sdbatch run folder (no config.yaml)")
    stored["run"]["dir"] = str(ns.run_dir)
    if ns.progress:
        stored["run"]["progress"] = ns.progress
    label = f"{ns.run_dir / 'config.yaml'}"
    try:
        job = schema.validate(stored, lambda key: label)
        code = run(job, lambda key: label, [], sys.argv)
    except (JobError, StackLoadError, WriteError) as e:
        fail(e)
    sys.exit(code)


def reproduce(args: list[str]) -> None:
    from pathlib import Path

    from sdbatch.reproduce import reproduce as check

    parser = argparse.ArgumentParser(prog="sdbatch reproduce")
    parser.add_argument("image", type=Path)
    parser.add_argument("--out", type=Path, help="also save the new render here")
    ns = parser.parse_args(args)
    try:
        same = check(ns.image, ns.out)
    except (JobError, ValueError, FileNotFoundError) as e:
        fail(e)
    sys.exit(0 if same else 1)


def main() -> None:
    args = sys.argv[1:]
    commands = {"resume": resume, "reproduce": reproduce}
    if args and args[0] in commands:
        commands[args[0]](args[1:])
    elif args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
    else:
        from sdbatch.job_folders import register

        if args and args[0] == "run":
            del sys.argv[1]
        register()
        store_schema_defaults()
        hydra_entry()
