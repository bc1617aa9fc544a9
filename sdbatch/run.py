"""A validated job, run end to end: matrix -> plan -> executor -> run folder -> summary.

Everything that can be known up front (image count, files, file names, a run folder made
by another job) is checked before the run folder is made or any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sdbatch import executors, inputs, matrix, model_specs, schema
from sdbatch.executors.driver import drive
from sdbatch.executors.intermediates import ControlMaps, Intermediates
from sdbatch.executors.local import LocalPool
from sdbatch.executors.worker import Setup, Worker, ends_the_task
from sdbatch.models import stack as stacks
from sdbatch.models.image_models import ImageModelFile
from sdbatch.models.upscaler_models import UpscalerFile
from sdbatch.output import records, run_folder
from sdbatch.output.filenames import file_name, too_long_on_windows
from sdbatch.output.lock import LOCK, OtherSubmission, RunFolderBusy, RunLock
from sdbatch.output.run_folder import (
    RunFolder,
    default_dir,
    differences,
    made_of,
    recorded_max_batch,
    resume_changes,
)
from sdbatch.output.writer import Writer
from sdbatch.plan import Plan, finals, make_plan, needed, size_problems
from sdbatch.progress import Progress
from sdbatch.prompts import sources
from sdbatch.reports import gallery, grids
from sdbatch.schema import Job, JobError, Origin, Problem
from sdbatch.stages.picture import Picture

EXIT_OK, EXIT_FAILURES, EXIT_INTERRUPTED = 0, 1, 130
FAILURES_SHOWN = 20  # the end-of-run summary names this many failed images


def describe(job: Job) -> str:
    """'2 zip(prompt, seed) x 3 cfg_scale' - what the image count is made of."""
    parts = []
    zipped = {k for group in job.zip for k in group}
    short = {dotted: name for name, dotted in schema.all_axes(job).items()}
    for group in job.zip:
        names = ", ".join(short[k] for k in group)
        parts.append(f"{len(schema.get(job, group[0]))} zip({names})")
    for key in schema.all_axes(job).values():
        value = schema.get(job, key)
        if key not in zipped and isinstance(value, tuple) and len(value) > 1:
            parts.append(f"{len(value)} {short[key]}")
    p = job.params
    if p.batch_count > 1:
        parts.append(f"{p.batch_count} batch_count")
    if p.batch_size > 1:
        parts.append(f"{p.batch_size} batch_size")
    return " x ".join(parts) or "one cell"


def portable(job: Job) -> dict:
    """The job as embedded in PNGs: without run and grid, which change no pixel, and of
    the executor only max_batch (which images share a pass, so reproduce makes the same
    passes)."""
    d = schema.to_dict(job)
    d.pop("run")
    d.pop("grid")
    d["executor"] = {"max_batch": job.executor.max_batch}
    return d


class StopFlag:
    """First Ctrl-C, or SIGTERM (SLURM's pre-emption, a container stopping): stop after the
    batches in flight, writing what they made. A second Ctrl-C: stop now (writes stay
    atomic). Either way the run can be resumed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopFlag:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            what = "Ctrl-C again to stop now" if signum == signal.SIGINT else "SIGTERM"
            print(f"\nstopping after the batches in flight ({what})", file=sys.stderr)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


@dataclass(frozen=True)
class Shard:
    """One task of a SLURM array (executors/slurm.py): it renders only ``indices``, in the
    run folder it shares with the other tasks of ``submission``."""

    submission: str
    number: int
    indices: frozenset[int]


@dataclass
class Prepared:
    path: Path
    fresh: bool
    nonce: int
    specs: dict[str, stacks.StackSpec]  # checkpoint name -> spec
    normal: Job  # as expanded (sources.normalize) and located (inputs.locate): config.yaml
    resolved: Job  # and with its random seeds drawn
    renders: list[matrix.Render]
    plan: Plan
    names: dict[int, str]
    networks: dict[tuple[str, str], stacks.NetworkFile]
    upscalers: dict[str, UpscalerFile]  # upscaler model name -> its file
    image_models: dict[str, ImageModelFile]  # face restorers by the job's name for them
    made_of: dict  # what a resume must not change (run.json)
    keys: dict[int, set[str]]  # index -> content keys an image already there may have


def same_file_names(names) -> list[str]:
    """File names that several images would share: equal, or equal but for case or Unicode
    composition (one file on NTFS and APFS, where the second image would overwrite the
    first)."""
    seen: dict[str, list[str]] = {}
    for name in names:
        seen.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    return [group[0] for group in seen.values() if len(group) > 1]


def prepare(job: Job, origin: Origin, picked: dict[int, tuple[str, str]] | None = None,
            only: frozenset[int] | None = None) -> Prepared:
    """Every up-front check, then the matrix and plan; raises JobError listing all problems.
    ``picked`` gives images their recorded prompts (reproduce: see matrix.expand); ``only``
    (a SLURM shard) keeps those images and the run's batches that make them, after the
    checks of the whole run."""
    problems: list[Problem] = []
    try:
        normal = sources.normalize(job, origin)
    except JobError as e:  # reported with everything else found below
        normal, problems = job, list(e.problems)
    normal, image_problems = inputs.locate(normal, origin)
    problems += image_problems
    images, image_problems = inputs.read(normal, origin) if not image_problems else ({}, [])
    problems += image_problems
    total = matrix.count(normal)
    if total > job.run.max_images:
        problems.append(Problem("run.max_images", f"the job makes {total} images, more than "
                                f"run.max_images = {job.run.max_images}: raise it "
                                f"(run.max_images={total}) or shrink the grid",
                                origin("run.max_images")))
    if device := executors.device_problem(job.executor, job.model.dtype):  # before the stacks
        problems.append(Problem(device[0], device[1], origin(device[0])))
        raise JobError(problems)
    specs = {}
    for checkpoint in dict.fromkeys(matrix.checkpoints(job)):
        spec, stack_problems = model_specs.resolve(job.model, job.paths, checkpoint, origin,
                                                   executors.spec_device(job.executor),
                                                   model_specs.speed_switches(job.executor))
        problems += stack_problems
        specs[checkpoint] = spec
    path = Path(job.run.dir) if job.run.dir else default_dir(job.job.name)
    if file := next((f for f in (path, *path.parents) if f.exists() and not f.is_dir()), None):
        problems.append(Problem("run.dir", f"{file} is a file, so {path} cannot be the run's "
                                "folder; give a folder (run.dir) that is not inside a file",
                                origin("run.dir")))
        raise JobError(problems)
    fresh = not (path / "run.json").exists()
    stored = None if fresh else RunFolder.stored_info(path)
    if stored is not None and "made_of" not in stored:  # made before run.json said it
        if diff := RunFolder.mismatch(path, schema.to_dict(job)):
            problems.append(_refusal(path, f"it was made by a different job (it differs in "
                                     f"{', '.join(diff)})", origin))
    elif fresh and path.exists() and any(not f.name.startswith(LOCK) for f in path.iterdir()):
        problems.append(Problem("run.dir", f"{path} exists and is not an sdbatch run folder; "
                                "give a new or empty folder", origin("run.dir")))
    if total > job.run.max_images:
        raise JobError(problems)  # not worth expanding a matrix that will not run
    nonce = RunFolder.new_nonce() if fresh else stored["seed_nonce"]
    resolved = matrix.resolve_seeds(normal, nonce)
    renders = matrix.expand(resolved, picked)
    model_names = {c: s.name if s else c for c, s in specs.items()}
    names = {r.index: file_name(job.run.filename, r, {"job": job.job.name,
                                                       "model_name": model_names[r.checkpoint]})
             for r in renders}
    networks, network_problems = model_specs.resolve_networks(normal, renders, origin)
    problems += network_problems
    upscalers, upscaler_problems = model_specs.resolve_upscalers(normal, origin)
    problems += upscaler_problems
    control_files, control_problems = model_specs.resolve_controlnets(normal, origin)
    problems += control_problems
    networks |= control_files
    specs = model_specs.with_embeddings(specs, renders, normal)
    restorers, restorer_problems = model_specs.resolve_face_restorers(normal, origin)
    problems += restorer_problems
    repeated = same_file_names(names.values())
    if repeated:
        problems.append(Problem("run.filename", f"'{job.run.filename}' gives {len(repeated)} "
                                f"names to several images (e.g. {repeated[0]}; names that "
                                "differ only in case are one file on Windows and macOS); "
                                "add [index]", origin("run.filename")))
    if problems:
        raise JobError(problems)
    network_hashes = {k: f.hash for k, f in networks.items()}
    upscaler_records = upscaler_params(upscalers, job.executor)
    controlnets = {name: (f.hash, f.short) for (kind, name), f in control_files.items()}
    plan = make_plan(renders, {c: s.identity for c, s in specs.items()},
                     job.executor.max_batch, network_hashes, images, upscaler_records,
                     restorers, controlnets, job.executor.vae_tile_px)
    problems += [Problem(key, message, origin(key))
                 for key, message in size_problems(plan, images)]
    if too_long := too_long_on_windows(path, run_files(plan, names.values())):
        problems.append(Problem("run.filename", too_long, origin("run.filename")))
    problems += model_specs.controlnet_problems(plan, specs, control_files, origin)
    if problems:
        raise JobError(problems)
    made = made_of(portable(normal), job.run.filename, {c: s.record for c, s in specs.items()},
                   {f"{kind}:{name}": digest for (kind, name), digest in network_hashes.items()}
                   | {f"upscaler:{name}": f.sha256 for name, f in upscalers.items()}
                   | {f"face_restorer:{name}": f.sha256 for name, f in restorers.items()},
                   {path: image.sha256 for path, image in images.items()},
                   job.executor.max_batch)
    keys = {r.index: {plan.key(r.index)} for r in renders}
    if stored is not None and "made_of" in stored:
        problems += _resume_problems(job, path, stored, made, renders, plan, keys,
                                     network_hashes, upscaler_records, origin, restorers,
                                     controlnets, images)
    if problems:
        raise JobError(problems)
    if only is not None:
        from sdbatch.executors.slurm import restrict

        renders = [r for r in renders if r.index in only]
        plan = restrict(plan, only)
    return Prepared(path, fresh, nonce, specs, normal, resolved, renders, plan, names, networks,
                    upscalers, restorers, made, keys)


def run_files(plan: Plan, names) -> list[str]:
    """The files the run writes, as paths in its folder (content keys at their length)."""
    key = "0" * 24
    calls = [c for chain in plan.chains.values() for c in chain]
    return ([f"images/{name}" for name in names]
            + ([f"intermediates/{key}.safetensors"] if any(len(chain) > 1 for chain in
                                                       plan.chains.values()) else [])
            + ([f"controlnet/{key}.png"] if any(c.params.get("controlnet") for c in calls)
               else []))


def upscaler_params(files: dict[str, UpscalerFile], executor: schema.Executor) -> dict:
    """What a call records of each upscaler model it uses, so its content key follows the
    file and the tiles it runs in (those change the pixels)."""
    return {name: {"name": f.name, "sha256": f.sha256,
                   "tile": [executor.upscaler_tile_px, executor.upscaler_tile_overlap]}
            for name, f in files.items()}


def setup(p: Prepared, job: Job) -> Setup:
    """What every worker of the run is given: the stacks, network files, upscaler models
    and face restorers it may load, and the executor's tile settings."""
    return Setup({s.identity: s for s in p.specs.values()}, p.networks, p.upscalers,
                 {f.sha256: f for f in p.image_models.values()}, job.model.dtype,
                 job.model.allow_pickle, job.executor.vae_tile_px,
                 job.executor.upscaler_tile_px, job.executor.upscaler_tile_overlap,
                 job.executor.stack_cache_gb, loras_of=loras_of(p.plan))


def loras_of(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Stack identity -> the LoRA names its batches apply (a batch applies its first
    render's, the same for all its renders)."""
    found: dict[str, dict[str, None]] = {}
    for batch in plan.batches:
        if batch.calls and batch.calls[0].stack and batch.renders:
            names = found.setdefault(batch.calls[0].stack, {})
            names.update(dict.fromkeys(name for name, _ in batch.renders[0].loras))
    return {stack: tuple(names) for stack, names in found.items()}


def _refusal(path: Path, why: str, origin: Origin) -> Problem:
    return Problem("run.dir", f"{path} cannot be resumed by this job: {why}; nothing there "
                   "was touched. Resume it with `sdbatch resume "
                   f"{inputs.command_arg(path)}` (its own job), or give a new run.dir",
                   origin("run.dir"))


def _resume_problems(job: Job, path: Path, stored: dict, made: dict,
                     renders: list[matrix.Render], plan: Plan, keys: dict[int, set[str]],
                     network_hashes: dict, upscaler_records: dict, origin: Origin,
                     restorers: dict[str, ImageModelFile] | None = None,
                     controlnets: dict | None = None,
                     images: dict | None = None) -> list[Problem]:
    """Refuse a resume that would render over the images there with other pixels: a changed
    expanded job, file name pattern or model file, or (unless allowed) another device or
    dtype. When that is allowed, adds to ``keys`` the content keys images have from earlier
    sessions on another device, so they are kept."""
    changed, device = resume_changes(stored["made_of"], made)
    problems = []
    if changed:
        problems.append(_refusal(path, f"it changed in {', '.join(changed)}", origin))
    if device and not job.run.allow_device_change:
        checkpoint = device[0].split(".")[1]
        was, now = stored["made_of"]["models"][checkpoint], made["models"][checkpoint]
        problems.append(_refusal(
            path, f"its images were rendered on {_how(was)}, this session would render on "
            f"{_how(now)}, and the pixels would differ; set run.allow_device_change=true to "
            "go on anyway", origin))
    was = recorded_max_batch(stored["made_of"])
    if was != job.executor.max_batch:
        problems.append(Problem(
            "executor.max_batch", f"{path} was rendered in forward passes of up to {was} "
            f"images, this session would make passes of up to {job.executor.max_batch}, and "
            f"an image's pixels depend on its pass by a rounding level; give "
            f"executor.max_batch={was} (`sdbatch resume {inputs.command_arg(path)}` does), "
            "or a new run.dir",
            origin("executor.max_batch")))
    if problems:
        return problems
    checkpoints = {r.checkpoint for r in renders}
    if job.run.allow_device_change:
        for session in stored.get("sessions", []):
            if checkpoints <= set(session.get("stacks", {})):
                other = make_plan(renders, session["stacks"], job.executor.max_batch,
                                  network_hashes, images, upscaler_records, restorers,
                                  controlnets, job.executor.vae_tile_px)
                for index in keys:
                    keys[index].add(other.key(index))
    entries = RunFolder.stored_entries(path)
    by_index = {r.index: r for r in renders}
    stale = sorted(i for i, e in entries.items()
                   if e.get("status") == "ok" and e.get("key") not in keys.get(i, ()))
    if stale:
        i = stale[0]
        what = _what_changed(entries[i].get("recipe", {}), by_index[i], plan.chains[i]) \
            if i in by_index else ["not in this job"]
        problems.append(_refusal(path, f"{len(stale)} image(s) there would come out "
                                 f"differently (image {i:05d}: "
                                 f"{', '.join(what) or 'its model stack'})", origin))
    return problems


def _what_changed(recipe: dict, render: matrix.Render, calls) -> list[str]:
    """What makes a recorded image's key differ: its params, else its stages' (an executor
    setting that changes pixels, such as the VAE's or an upscaler's tiles)."""
    now = json.loads(json.dumps({"params": render.params(),  # tuples as the record has them
                                 "stages": [call.params for call in calls]}))
    return differences(recipe.get("params", {}), now["params"]) or [
        f"{call.kind}.{key}" for was, call, params in zip(recipe.get("stages", []), calls,
                                                          now["stages"], strict=False)
        for key in differences(was.get("params", {}), params)]


def _how(record: dict) -> str:
    """'cuda in float16 with compile, fuse_loras': where a stack record computes."""
    switches = record.get("switches")
    return f"{record['device']} in {record['dtype']}" + (
        f" with {', '.join(switches)}" if switches else "")


def render_one(job: Job, origin: Origin, index: int,
               picked: dict[int, tuple[str, str]] | None = None,
               oom_retries: dict[str, tuple[str, ...]] | None = None
               ) -> tuple[Prepared, matrix.Render, Picture]:
    """One image of a job, rendered in a scratch folder that is removed after: its whole
    chain, in the batches the full run would use (so the bytes are the run's), those that
    ran out of memory then made as they were then (``oom_retries``, see Setup)."""
    scratch = Path(tempfile.mkdtemp(prefix="sdbatch-one-"))
    try:
        job = dataclasses.replace(job, run=dataclasses.replace(job.run, dir=str(scratch / "run")))
        p = prepare(job, origin, picked)
        others = {r.index for r in p.renders} - {index}
        store = Intermediates(scratch, int(job.executor.intermediate_cache_gb * 2**30))
        final = p.plan.key(index)
        pool = LocalPool(Worker(dataclasses.replace(setup(p, job), oom_retries=oom_retries or {}),
                                stacks.pick_device(job.executor.device)))
        try:
            for result in drive(needed(p.plan, others, lambda key: False), pool, store,
                                ControlMaps(scratch)):
                for call, picture in zip(result.batch.calls, result.pictures or [],
                                         strict=False):
                    if call.key == final:
                        return p, next(r for r in p.renders if r.index == index), picture
                if result.error and final in [c.key for c in result.batch.calls]:
                    raise ValueError(f"the render failed: {result.error}")
        finally:
            pool.close()
        raise ValueError(f"image {index} was not rendered")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_grids(path: Path) -> list[Path]:
    """The run's X/Y/Z plot sheets as the folder now is (partial after an interruption); a
    sheet that cannot be written is said, never a reason to fail a run whose images are."""
    try:
        return grids.write_all(path)
    except (OSError, ValueError, JobError) as e:
        print(f"  grids not written ({e}); write them with: sdbatch grid "
              f"{inputs.command_arg(path)}")
        return []


def check_still_fresh(p: Prepared, origin: Origin) -> None:
    """Under the folder's lock: a folder prepared as new that another process made
    meanwhile is refused (making it again would replace that run's run.json)."""
    if p.fresh and (p.path / "run.json").exists():
        raise JobError([Problem("run.dir", f"another process made {p.path} a moment ago; "
                                "give another run.dir", origin("run.dir"))])


def run(job: Job, origin: Origin, overrides: list[str], argv: list[str],
        shard: Shard | None = None, started: list[executors.Started] | None = None) -> int:
    """Run ``job`` here, or (executor=slurm) submit it as an array; ``shard``: run one task
    of such an array; ``started``: executor=multi's workers, started early."""
    if job.executor.name == "slurm" and shard is None:
        from sdbatch.executors import slurm

        return slurm.submit(job, origin, overrides, argv)
    p = prepare(job, origin, only=shard.indices if shard else None)
    if shard and p.fresh:
        raise JobError([Problem("run.dir", f"{p.path} has no run.json: the array's driver "
                                "makes the run folder before it submits", origin("run.dir"))])
    lock = RunLock(p.path, run_folder.now(), shard and (shard.submission, shard.number))
    try:
        lock.acquire()
    except (RunFolderBusy, OtherSubmission) as e:
        raise JobError([Problem("run.dir", str(e), origin("run.dir"))]) from None
    try:
        check_still_fresh(p, origin)
        if lock.took_over:
            print(f"note: {lock.took_over} stopped without releasing {p.path}; taking it over")
        return _render(job, p, overrides, argv, shard, started)
    finally:
        lock.release()


def _render(job: Job, p: Prepared, overrides: list[str], argv: list[str],
            shard: Shard | None = None, started: list[executors.Started] | None = None) -> int:
    """The run itself, with the run folder locked (``shard``: shared with its array), in
    executor.threads torch threads where this process renders (local, a SLURM task)."""
    previous = torch.get_num_threads()
    if job.executor.threads and job.executor.name in ("local", "slurm"):
        torch.set_num_threads(job.executor.threads)
    try:
        return _render_run(job, p, overrides, argv, shard, started)
    finally:
        torch.set_num_threads(previous)


def _render_run(job: Job, p: Prepared, overrides: list[str], argv: list[str],
                shard: Shard | None, started: list[executors.Started] | None) -> int:
    path, renders, plan = p.path, p.renders, p.plan
    folder = (RunFolder.create(path, schema.to_dict(p.normal), overrides, p.nonce,
                               len(renders), p.made_of)
              if p.fresh else RunFolder(path))

    done = {r.index for r in renders if folder.is_done(r.index, p.keys[r.index])}
    store = Intermediates(path, int(job.executor.intermediate_cache_gb * 2**30))
    maps = ControlMaps(path)
    batches = needed(plan, done, store.has)
    finishes = finals(plan)
    by_index = {r.index: r for r in renders}
    say = (lambda *a: None) if job.run.progress == "quiet" else print
    count = f"{len(renders)} image{'s' if len(renders) != 1 else ''}"
    print(f"{job.job.name}: {count} ({describe(p.resolved)}) -> {path}")
    if done:
        print(f"  resuming: {len(done)} already there, {len(renders) - len(done)} to render")
    device = stacks.pick_device(executors.spec_device(job.executor))
    first = next(iter(p.specs.values()))
    folder.start_session({**stacks.machine(device), "dtype": first.record["dtype"],
                          "switches": list(first.switches),
                          **executors.session_record(job.executor)},
                         {c: s.identity for c, s in p.specs.items()}, argv,
                         shard and {"submission": shard.submission, "shard": shard.number})
    embedded_job = portable(p.resolved)
    update_gallery = gallery.Updater(path)
    update_gallery()  # there from the start: what a resume found, what is still to come
    progress = Progress(job.run.progress, len(renders), len(done))
    counts = Counter(rendered=0, skipped=len(done), failed=0)
    failures: list[str] = []
    start = time.perf_counter()
    with StopFlag() as stop:
        writer = Writer(folder)
        pool = None
        try:
            try:
                pool = executors.open_pool(job.executor, setup(p, job), device, progress.step,
                                           f"{p.nonce:x}", started)
                stack_names = {s.identity: s.name for s in p.specs.values()}
                for result in drive(batches, pool, store, maps,
                                    lambda: stop.requested,
                                    lambda b: progress.stage(
                                        b.kind, stack_names.get(b.calls[0].stack, ""))):
                    per_image = result.seconds / len(result.batch.calls)
                    finished = [(i, by_index[index]) for i, call in enumerate(result.batch.calls)
                                for index in finishes.get(call.key, ()) if index not in done]
                    for i, r in finished:
                        calls = plan.chains[r.index]
                        spec = p.specs[r.checkpoint]
                        found = {} if result.error else result.pictures[i].chain_found
                        entry = {"index": r.index, "id": f"{r.index:05d}",
                                 "key": plan.key(r.index), "seed": r.seed,
                                 "recipe": records.recipe(r, spec, calls, found,
                                                          result.machine),
                                 "stack": spec.identity,
                                 **records.control_maps(calls),
                                 "timings": {"render_s": round(per_image, 4),
                                             "batch_s": round(result.seconds, 4)},
                                 **({"oom_retries": list(result.retries)}
                                    if result.retries else {}),
                                 **({"worker_restarts": result.restarts}
                                    if result.restarts else {})}
                        if result.error:
                            writer.failure(entry, result.error)
                            counts["failed"] += 1
                            failures.append(f"{r.index:05d} ({p.names[r.index]}): "
                                            f"{result.error.splitlines()[0]}")
                            say(f"  image {r.index:05d} failed: {result.error.splitlines()[0]}")
                        else:
                            writer.image(p.names[r.index], result.pictures[i].image,
                                         records.infotext(r, p.specs, calls),
                                         records.png_recipe(r, spec, calls, embedded_job,
                                                            found, result.machine), entry)
                            counts["rendered"] += 1
                        progress.advance()
                    update_gallery()  # at most every gallery.EVERY_S
            finally:
                try:
                    if pool is not None:
                        pool.close()
                finally:
                    writer.close()  # every image queued is written, after a Ctrl-C too
        except KeyboardInterrupt:
            stop.requested = True
        except SystemExit:  # submitit requeues a task SLURM warned of its time limit
            progress.close()
            folder.finish_session("interrupted", dict(counts), top=shard is None)
            raise
        except Exception as e:  # a model or write failing, a bug, SLURM's time up: run.json
            # says how it ended (the command line reports the first two by their message)
            progress.close()
            folder.finish_session("interrupted" if ends_the_task(e) else "failed",
                                  dict(counts), top=shard is None)
            raise
        finally:
            progress.close()
    elapsed = time.perf_counter() - start
    finished = counts["rendered"] + counts["skipped"] + counts["failed"]
    status = ("interrupted" if finished < len(renders)
              else "failed" if counts["failed"] else "complete")
    folder.finish_session(status, dict(counts), top=shard is None)
    if status == "complete" and not job.run.keep_intermediates and shard is None:
        store.remove_all()
    sheets = write_grids(path) if shard is None else []
    update_gallery(force=True)  # last: it links what stays, the sheets just made included
    rate = f", {counts['rendered'] / elapsed:.2f} images/s" if counts["rendered"] else ""
    print(f"{status}: {counts['rendered']} rendered, {counts['skipped']} already there, "
          f"{counts['failed']} failed, in {elapsed:.1f} s{rate} -> {path}")
    if sheets:
        print(f"  grids: {', '.join(str(p.relative_to(path)) for p in sheets)}")
    print(f"  gallery: {path / gallery.FILE}")
    if failures:
        print(f"failed images ({len(failures)}; their errors are in {path / 'manifest.jsonl'}):")
        for line in failures[:FAILURES_SHOWN]:
            print(f"  {line}")
        if len(failures) > FAILURES_SHOWN:
            print(f"  ... and {len(failures) - FAILURES_SHOWN} more")
    if status != "complete":
        print(f"  to finish the run: sdbatch resume {inputs.command_arg(path)}")
    return {"complete": EXIT_OK, "failed": EXIT_FAILURES}.get(status, EXIT_INTERRUPTED)
