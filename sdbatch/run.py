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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdbatch import inputs, matrix, model_specs, schema
from sdbatch.executors.intermediates import ControlMaps, Intermediates
from sdbatch.executors.local import execute
from sdbatch.models import stack as stacks
from sdbatch.models.image_models import ImageModelFile, ImageModels
from sdbatch.models.stack import StackCache, StackLoadError
from sdbatch.models.upscaler_models import UpscalerFile, UpscalerModels
from sdbatch.output import records, run_folder
from sdbatch.output.filenames import file_name
from sdbatch.output.lock import LOCK, OtherSubmission, RunFolderBusy, RunLock
from sdbatch.output.run_folder import (
    RunFolder,
    default_dir,
    differences,
    made_of,
    resume_changes,
)
from sdbatch.output.writer import WriteError, Writer
from sdbatch.plan import Plan, finals, make_plan, needed, size_problems
from sdbatch.progress import Progress
from sdbatch.prompts import sources
from sdbatch.schema import Job, JobError, Origin, Problem
from sdbatch.stages.picture import Picture

EXIT_OK, EXIT_FAILURES, EXIT_INTERRUPTED = 0, 1, 130


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
    """The job as embedded in PNGs: without run/executor, which change no pixel."""
    d = schema.to_dict(job)
    d.pop("run")
    d.pop("executor")
    return d


class StopFlag:
    """First Ctrl-C: stop after the current batch. Second: stop now (writes stay atomic)."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopFlag:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the current batch (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


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
    resolved: Job
    renders: list[matrix.Render]
    plan: Plan
    names: dict[int, str]
    networks: dict[tuple[str, str], stacks.NetworkFile]
    upscalers: dict[str, UpscalerFile]  # upscaler model name -> its file
    image_models: dict[str, ImageModelFile]  # face restorers by the job's name for them
    made_of: dict  # what a resume must not change (run.json)
    keys: dict[int, set[str]]  # index -> content keys an image already there may have


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
    specs = {}
    for checkpoint in dict.fromkeys(matrix.checkpoints(job)):
        spec, stack_problems = model_specs.resolve(job.model, job.paths, checkpoint, origin,
                                              job.executor.device)
        problems += stack_problems
        specs[checkpoint] = spec
    path = Path(job.run.dir) if job.run.dir else default_dir(job.job.name)
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
    repeated = [n for n, c in Counter(names.values()).items() if c > 1]
    if repeated:
        problems.append(Problem("run.filename", f"'{job.run.filename}' gives {len(repeated)} "
                                f"names to several images (e.g. {repeated[0]}); add [index]",
                                origin("run.filename")))
    if problems:
        raise JobError(problems)
    network_hashes = {k: f.hash for k, f in networks.items()}
    upscaler_records = upscaler_params(upscalers, job.executor)
    controlnets = {name: (f.hash, f.short) for (kind, name), f in control_files.items()}
    plan = make_plan(renders, {c: s.identity for c, s in specs.items()}, job.params.batch_size,
                     network_hashes, images, upscaler_records, restorers, controlnets)
    problems += [Problem(key, message, origin(key))
                 for key, message in size_problems(plan, images)]
    problems += model_specs.controlnet_problems(plan, specs, control_files, origin)
    if problems:
        raise JobError(problems)
    made = made_of(portable(normal), job.run.filename, {c: s.record for c, s in specs.items()},
                   {f"{kind}:{name}": digest for (kind, name), digest in network_hashes.items()}
                   | {f"upscaler:{name}": f.sha256 for name, f in upscalers.items()}
                   | {f"face_restorer:{name}": f.sha256 for name, f in restorers.items()},
                   {path: image.sha256 for path, image in images.items()})
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
    return Prepared(path, fresh, nonce, specs, resolved, renders, plan, names, networks,
                    upscalers, restorers, made, keys)


def upscaler_params(files: dict[str, UpscalerFile], executor: schema.Executor) -> dict:
    """What a call records of each upscaler model it uses, so its content key follows the
    file and the tiles it runs in (those change the pixels)."""
    return {name: {"name": f.name, "sha256": f.sha256,
                   "tile": [executor.upscaler_tile_px, executor.upscaler_tile_overlap]}
            for name, f in files.items()}


def upscaler_models(p: Prepared, job: Job, device) -> UpscalerModels:
    """The run's upscaler models, loaded on first use on the executor's device and dtype."""
    return UpscalerModels(p.upscalers, device, stacks.pick_dtype(job.model.dtype, device),
                          job.model.allow_pickle, job.executor.upscaler_tile_px,
                          job.executor.upscaler_tile_overlap)


def _refusal(path: Path, why: str, origin: Origin) -> Problem:
    return Problem("run.dir", f"{path} cannot be resumed by this job: {why}; nothing there "
                   "was touched. Resume it with `sdbatch resume "
                   f"{path}` (its own job), or give a new run.dir", origin("run.dir"))


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
            path, f"its images were rendered on {was['device']} in {was['dtype']}, this "
            f"session would render on {now['device']} in {now['dtype']}, and the pixels would "
            "differ; set run.allow_device_change=true to go on anyway", origin))
    if problems:
        return problems
    checkpoints = {r.checkpoint for r in renders}
    if job.run.allow_device_change:
        for session in stored.get("sessions", []):
            if checkpoints <= set(session.get("stacks", {})):
                other = make_plan(renders, session["stacks"], job.params.batch_size,
                                  network_hashes, images, upscaler_records, restorers,
                                  controlnets)
                for index in keys:
                    keys[index].add(other.key(index))
    entries = RunFolder.stored_entries(path)
    by_index = {r.index: r for r in renders}
    stale = sorted(i for i, e in entries.items()
                   if e.get("status") == "ok" and e.get("key") not in keys.get(i, ()))
    if stale:
        i = stale[0]
        what = (differences(entries[i].get("recipe", {}).get("params", {}),
                            json.loads(json.dumps(by_index[i].params())))
                if i in by_index else ["not in this job"])
        problems.append(_refusal(path, f"{len(stale)} image(s) there would come out "
                                 f"differently (image {i:05d}: "
                                 f"{', '.join(what) or 'its model stack'})", origin))
    return problems


def _restorers(p: Prepared, job: Job, device) -> ImageModels:
    """The run's face restorers, loaded on first use on the executor's device."""
    return ImageModels({f.sha256: f for f in p.image_models.values()}, device,
                       job.model.allow_pickle)


def render_one(job: Job, origin: Origin, index: int,
               picked: dict[int, tuple[str, str]] | None = None
               ) -> tuple[Prepared, matrix.Render, Picture]:
    """One image of a job, rendered in a scratch folder that is removed after: its whole
    chain, in the batches the full run would use (so the bytes are the run's)."""
    scratch = Path(tempfile.mkdtemp(prefix="sdbatch-one-"))
    try:
        job = dataclasses.replace(job, run=dataclasses.replace(job.run, dir=str(scratch / "run")))
        p = prepare(job, origin, picked)
        others = {r.index for r in p.renders} - {index}
        store = Intermediates(scratch, int(job.executor.intermediate_cache_gb * 2**30))
        device = stacks.pick_device(job.executor.device)
        cache = StackCache(device)
        final = p.plan.key(index)
        for result in execute(needed(p.plan, others, lambda key: False), p.specs, cache,
                              p.networks, store=store, consumers=p.plan.consumers(),
                              vae_tile_px=job.executor.vae_tile_px,
                              upscalers=upscaler_models(p, job, device),
                              restorers=_restorers(p, job, cache.device),
                              maps=ControlMaps(scratch)):
            for call, picture in zip(result.batch.calls, result.pictures or [], strict=False):
                if call.key == final:
                    return p, next(r for r in p.renders if r.index == index), picture
            if result.error and final in [c.key for c in result.batch.calls]:
                raise ValueError(f"the render failed: {result.error}")
        raise ValueError(f"image {index} was not rendered")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(job: Job, origin: Origin, overrides: list[str], argv: list[str],
        shard: Shard | None = None) -> int:
    """Run ``job`` here, or (executor=slurm) submit it as an array; ``shard``: run one task
    of such an array."""
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
        if p.fresh and (p.path / "run.json").exists():
            raise JobError([Problem("run.dir", f"another process made {p.path} a moment ago; "
                                    "give another run.dir", origin("run.dir"))])
        if lock.took_over:
            print(f"note: {lock.took_over} stopped without releasing {p.path}; taking it over")
        return _render(job, p, overrides, argv, shard)
    finally:
        lock.release()


def _render(job: Job, p: Prepared, overrides: list[str], argv: list[str],
            shard: Shard | None = None) -> int:
    """The run itself, with the run folder locked (``shard``: shared with its array)."""
    path, renders, plan = p.path, p.renders, p.plan
    folder = (RunFolder.create(path, schema.to_dict(job), overrides, p.nonce, len(renders),
                               p.made_of)
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
    device = stacks.pick_device(job.executor.device)
    first = next(iter(p.specs.values()))
    folder.start_session({**stacks.machine(device), "dtype": first.record["dtype"]},
                         {c: s.identity for c, s in p.specs.items()}, argv,
                         shard and {"submission": shard.submission, "shard": shard.number})
    embedded_job = portable(p.resolved)
    progress = Progress(job.run.progress, len(renders), len(done))
    counts = Counter(rendered=0, skipped=len(done), failed=0)
    start = time.perf_counter()
    with StopFlag() as stop:
        writer = Writer(folder)
        try:
            try:
                cache = StackCache(device, job.executor.stack_cache_gb)
                for result in execute(batches, p.specs, cache, p.networks, progress.step,
                                      lambda: stop.requested, store, plan.consumers(),
                                      job.executor.vae_tile_px,
                                      upscaler_models(p, job, device),
                                      _restorers(p, job, device), maps):
                    per_image = result.seconds / len(result.batch.calls)
                    finished = [(i, by_index[index]) for i, call in enumerate(result.batch.calls)
                                for index in finishes.get(call.key, ()) if index not in done]
                    for i, r in finished:
                        calls = plan.chains[r.index]
                        spec = p.specs[r.checkpoint]
                        found = {} if result.error else result.pictures[i].chain_found
                        entry = {"index": r.index, "id": f"{r.index:05d}",
                                 "key": plan.key(r.index), "seed": r.seed,
                                 "recipe": records.recipe(r, spec, calls, found),
                                 "stack": spec.identity,
                                 **records.control_maps(calls),
                                 "timings": {"render_s": round(per_image, 4),
                                             "batch_s": round(result.seconds, 4)}}
                        if result.error:
                            writer.failure(entry, result.error)
                            counts["failed"] += 1
                            say(f"  image {r.index:05d} failed: {result.error.splitlines()[0]}")
                        else:
                            writer.image(p.names[r.index], result.pictures[i].image,
                                         records.infotext(r, spec, calls),
                                         records.png_recipe(r, spec, calls, embedded_job,
                                                            found), entry)
                            counts["rendered"] += 1
                        progress.advance()
            finally:
                writer.close()  # every image queued is written, after a Ctrl-C too
        except KeyboardInterrupt:
            stop.requested = True
        except (StackLoadError, WriteError):
            progress.close()
            folder.finish_session("failed", dict(counts), top=shard is None)
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
    print(f"{status}: {counts['rendered']} rendered, {counts['skipped']} already there, "
          f"{counts['failed']} failed, in {elapsed:.1f} s -> {path}")
    if status != "complete":
        print(f"  to finish the run: sdbatch resume {path}")
    return {"complete": EXIT_OK, "failed": EXIT_FAILURES}.get(status, EXIT_INTERRUPTED)
