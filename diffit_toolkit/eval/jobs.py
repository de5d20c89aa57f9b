"""Sweeps are jobs: one training run plus its scoring is a self-contained, resumable job, and
where the jobs run is a launcher choice.

A job is described by a [`RunSpec`][diffit_toolkit.eval.jobs.RunSpec] (plain data: a recipe
path, overrides, a seed, a run folder, the evaluation settings and the plugin modules to load).
[`run_job`][diffit_toolkit.eval.jobs.run_job] trains the run (resuming from the run folder's
newest checkpoint), samples and scores its checkpoints, and writes ``result.json`` into the run
folder. Reports are rebuilt from these files at any time.

Launchers ([`launch`][diffit_toolkit.eval.jobs.launch]):

* ``inline`` (``--jobs 1``): one job after another in this process;
* ``local`` (``--jobs N``): N worker processes at once on this machine; on a CPU each gets
  ``max(1, cores // N)`` threads, with GPUs each gets one GPU (``CUDA_VISIBLE_DEVICES``);
* ``slurm`` through submitit (``pip install 'diffit-toolkit[cluster]'``), one SLURM job per run;
  ``submitit-local`` runs the same path through submitit's local executor (a dry run of a
  cluster setup on one machine).

A job stopped by a signal (preemption, ``kill``, Ctrl-C) checkpoints and reports ``stopped``; the
same command run again skips finished runs and resumes the stopped ones from their checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffit_toolkit.errors import RunFailure

#: The file a finished job writes into its run folder (its curve rows and its identity).
RESULT_FILE = "result.json"
#: What a job that ran in its own process leaves beside it: its status, its output and its pid.
STATUS_FILE, LOG_FILE, PID_FILE = "job_status.json", "job.log", "job.pid"
#: Images in the sample grid each training run writes at its end (the metric uses ``num_images``).
GRID_IMAGES = 20
#: Exit code of a job process whose training was stopped by a signal (checkpoint kept).
EXIT_STOPPED = 3
LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass
class RunSpec:
    """One job: train ``recipe`` (with ``overrides``) for ``seed`` into ``run_dir`` and score it.

    Attributes:
        name: the label of the run in reports (an ablation recipe's file stem, a benchmark's mechanism).
        recipe: recipe file (absolute path: a job may run in another working directory).
        overrides: ``--set`` style overrides applied to the recipe (budget, mechanism, ...).
        seed: training seed (also the sampling seed).
        run_dir: the run folder (absolute).
        judge_dir: folder of the offline judge's cached classifier (prepared before launching).
        eval_every: score every this many training steps (0: the final step only).
        num_images: samples per evaluation.
        sample_steps: sampling steps (default: the recipe's).
        guidance_scale: guidance scale of the curve (default: the recipe's).
        guidance_scales: sweep these at the final checkpoint and keep the best FD (conditional
            models only: an unconditional model is scored once).
        plugins: plugin modules (dotted names or absolute ``.py`` paths) to load in the job's process.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        key: the identity of everything that determines the result (recipe content, overrides,
            evaluation settings, code versions); a result with another key is not reused.
        extra: free-form facts copied into the result (e.g. the benchmark's testbed).
    """

    name: str
    recipe: str
    overrides: list[str]
    seed: int
    run_dir: str
    judge_dir: str
    eval_every: int = 0
    num_images: int = 200
    sample_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scales: list[float] | None = None
    plugins: list[str] = field(default_factory=list)
    device: str = "cpu"
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- identity ----------------------------------------------------------------------------------


def digest(data: Any, length: int = 12) -> str:
    """A short, stable hash of JSON-able ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_digest(path: str | Path | None) -> str | None:
    """Hash of a file's bytes (``None`` when there is no such file)."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def mechanism_source(name: str) -> str | None:
    """Hash of the source file that defines the registered conditioning mechanism ``name``: a
    changed mechanism is a new experiment, its old results are not reused."""
    import inspect

    from diffit_toolkit.registry import conditioning

    if name not in conditioning:
        return None
    try:
        path = inspect.getsourcefile(conditioning.get(name))
    except TypeError:  # an object without a source file (built at run time)
        return None
    return file_digest(path)


def spec_key(spec: RunSpec, recipe: Any, code: dict[str, Any] | None = None) -> str:
    """The identity of ``spec``'s result: the resolved recipe (its run folder and seed aside: the
    seed is part of the run folder), the evaluation settings, the toolkit version and ``code``
    (e.g. the mechanism's source hash) and the judge that scores it."""
    from diffit_toolkit import __version__
    from diffit_toolkit.eval.ablation import judge_file

    resolved = recipe.to_dict()
    resolved.pop("output_dir", None)
    resolved.get("train", {}).pop("seed", None)
    resolved.pop("name", None)
    evaluation = dict(eval_every=spec.eval_every, num_images=spec.num_images, sample_steps=spec.sample_steps,
                      guidance_scale=spec.guidance_scale, guidance_scales=spec.guidance_scales,
                      judge=judge_file(str(resolved.get("data", {}).get("kind", "digits"))))
    return digest(dict(recipe=resolved, evaluation=evaluation, version=__version__, code=code or {}))


# -- results -----------------------------------------------------------------------------------


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The result a finished job wrote into ``run_dir`` (``None`` when there is none or it is unreadable)."""
    path = Path(run_dir) / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"] else None


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


def is_finished(spec: RunSpec) -> bool:
    """A result with the same key is in the spec's run folder."""
    result = read_result(spec.run_dir)
    return result is not None and result.get("key") == spec.key


# -- the job -----------------------------------------------------------------------------------


def _plugin_loaded(target: str) -> bool:
    """Whether plugin module ``target`` is already imported in this process (loading a ``.py``
    file twice would register its mechanisms twice)."""
    if target.endswith(".py"):
        module = sys.modules.get(Path(target).stem)
        file = getattr(module, "__file__", None)
        return file is not None and Path(file).resolve() == Path(target).resolve()
    return target in sys.modules


def load_plugins(plugins: Sequence[str]) -> None:
    """Load the plugin modules a job needs into this process (those not loaded yet)."""
    from diffit_toolkit.registry import PLUGINS_ENV, current_system

    # a child process loads exactly these (absolute paths work from any working directory)
    if plugins:
        os.environ[PLUGINS_ENV] = ",".join(plugins)
    system = current_system()
    system.ensure_loaded()
    for target in plugins:
        if not _plugin_loaded(target):
            system.load_module(target)


def current_plugins() -> list[str]:
    """The plugin modules this process loaded with ``-p`` / ``DIFFIT_TOOLKIT_PLUGINS``, ``.py``
    paths made absolute, so that a job in another process (or on another node) loads them too."""
    from diffit_toolkit.registry import PLUGINS_ENV

    out = []
    for target in filter(None, (t.strip() for t in os.environ.get(PLUGINS_ENV, "").split(","))):
        out.append(str(Path(target).resolve()) if target.endswith(".py") else target)
    return list(dict.fromkeys(out))


def _loss_at(run_dir: Path, step: int) -> float:
    """The last logged training loss at or before ``step`` (``nan`` when none)."""
    losses = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec and "step" in rec and rec["step"] <= step:
                losses.append(float(rec["loss"]))
    return losses[-1] if losses else float("nan")


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children: user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_overrides(spec: RunSpec, max_steps: int) -> list[str]:
    """The overrides a job trains with: the spec's, then its seed, run folder and checkpoint grid."""
    every = spec.eval_every or max_steps
    out = [*spec.overrides, f"train.seed={spec.seed}", f"output_dir={spec.run_dir}",
           f"train.ckpt_every={every}", f"train.keep_last={max_steps // every + 2}", f"sample.num_images={GRID_IMAGES}"]
    if spec.sample_steps is not None:
        out.append(f"sample.steps={int(spec.sample_steps)}")
    return out


def prepare_run_dir(spec: RunSpec) -> Path:
    """Create the run folder with its resolved recipe (so the job's log may sit beside it)."""
    from diffit_toolkit.build import load_recipe

    run_dir = Path(spec.run_dir)
    base = load_recipe(spec.recipe, spec.overrides)
    recipe = load_recipe(spec.recipe, run_overrides(spec, base.train.max_steps))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "recipe.yaml").is_file():
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    return run_dir


def run_job(spec: dict[str, Any] | RunSpec) -> dict[str, Any]:
    """Train and score one run; the job function of every launcher (top level, plain data: it
    pickles for submitit). Returns the status: ``{"status": "done", ...}`` with the result (also
    written to ``<run_dir>/result.json``), or ``{"status": "stopped", "stopped_by", "step"}``
    when a signal stopped the training (its checkpoint is kept: running the job again resumes it)."""
    spec = spec if isinstance(spec, RunSpec) else RunSpec(**spec)
    load_plugins(spec.plugins)
    import torch

    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.eval.ablation import judge_for
    from diffit_toolkit.eval.sweep import best_row, guidance_sweep
    from diffit_toolkit.inference.pipeline import load_pipeline
    from diffit_toolkit.recipe import SampleSection
    from diffit_toolkit.runs import checkpoint_step, list_checkpoints
    from diffit_toolkit.train import train

    threads = os.environ.get("DIFFIT_TOOLKIT_JOB_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    run_dir = Path(spec.run_dir)
    base = load_recipe(spec.recipe, spec.overrides)
    max_steps = base.train.max_steps
    every = spec.eval_every or max_steps
    recipe = load_recipe(spec.recipe, run_overrides(spec, max_steps))
    mechanism = str(recipe.model.get("mechanism", spec.name))
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    result = train(recipe, device=spec.device, progress=False)
    if result.stopped_by:  # asked to stop (preemption, Ctrl-C): never score a half-trained run
        return {"status": "stopped", "stopped_by": result.stopped_by, "step": int(result.step),
                "max_steps": max_steps, "name": spec.name, "seed": spec.seed, "run_dir": str(run_dir)}
    train_seconds, train_cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    params = sum(p.numel() for p in result.model.parameters()) if result.model is not None else math.nan
    _, judge, _ = judge_for(recipe.data, Path(spec.judge_dir))
    settings = recipe.sample.model_dump()
    if spec.guidance_scale is not None:
        settings["guidance_scale"] = float(spec.guidance_scale)
    sample = SampleSection.model_validate(settings)
    rows, sweep_rows = [], []
    # the evaluation grid only: a checkpoint left by a stop (preemption) is off it
    checkpoints = [(checkpoint_step(c), c) for c in list_checkpoints(result.run_dir)]
    checkpoints = [(k, c) for k, c in checkpoints if k is not None and (k % every == 0 or k == result.step)]
    for step, ckpt in checkpoints:
        gen = load_pipeline(ckpt, device=spec.device)
        final = ckpt == checkpoints[-1][1]
        # guidance needs classes: an unconditional model is scored once, at the recipe's setting
        sweep = bool(spec.guidance_scales) and final and bool(gen.num_classes)
        scales = spec.guidance_scales if sweep else [sample.guidance_scale]
        scored = guidance_sweep(gen, scales, sample, spec.num_images, judge, seed=spec.seed)
        row = dict(recipe=spec.name, mechanism=mechanism, seed=spec.seed, step=step, train_seconds=train_seconds,
                   loss=_loss_at(run_dir, step), train_cpu_seconds=train_cpu, params=params)
        if sweep:
            sweep_rows.extend({**row, **r} for r in scored)
        rows.append({**row, **best_row(scored)})
        del gen
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = {"status": "done", "name": spec.name, "mechanism": mechanism, "seed": spec.seed, "key": spec.key,
           "params": params, "step": int(result.step), "rows": rows, "sweep_rows": sweep_rows,
           "spec": spec.as_dict(), "extra": spec.extra}
    write_json(run_dir / RESULT_FILE, out)
    return out


class RunJob:
    """The job as a callable submitit can requeue: on a SLURM timeout or preemption signal it
    resubmits itself, and the requeued job resumes from the run folder's newest checkpoint."""

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        return run_job(spec)

    def checkpoint(self, spec: dict[str, Any]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(), spec)


# -- launchers ---------------------------------------------------------------------------------


@dataclass
class Launcher:
    """Where the jobs run.

    Attributes:
        kind: ``local`` (this machine), ``slurm`` (through submitit) or ``submitit-local``
            (submitit's local executor: the cluster path on this machine).
        jobs: jobs at once (``local``: worker processes; 1 runs them one after another in this
            process; ``slurm``: the array's parallelism).
        partition: SLURM partition.
        time_min: SLURM time limit per job, minutes.
        gpus: GPUs per SLURM job.
        cpus: CPUs per SLURM job (default: 10 per GPU, else 4).
        folder: where submitit keeps its logs and pickles (default ``<out>/submitit``).
    """

    kind: str = "local"
    jobs: int = 1
    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int | None = None
    folder: Path | None = None

    def check(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{self.kind}'")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}")
        if self.kind != "local":
            require_submitit()
        if self.kind == "slurm":
            import shutil

            if shutil.which("srun") is None:
                raise ValueError("--launcher slurm: no SLURM on this machine (srun not found); submit from the cluster's "
                                 "login node, or try the setup here with --launcher submitit-local")


class LauncherError(RunFailure, RuntimeError):
    """A job failed (its log is named) or the launcher could not run."""


def require_submitit() -> None:
    """One line (a usage error) when submitit (the SLURM launcher) is not installed."""
    import importlib.util

    if importlib.util.find_spec("submitit") is None:
        raise ValueError("--launcher slurm needs submitit, which is not installed: pip install 'diffit-toolkit[cluster]'")


def launch(specs: Sequence[RunSpec], launcher: Launcher, log: Callable[[str], None] = print,
           done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run ``specs`` with ``launcher``; returns one status per spec, in order. Every job writes its
    result into its run folder, so a caller reads the results from the folders afterwards.

    Args:
        specs: the jobs.
        launcher: where they run.
        log: called with one line per finished (or stopped, or failed) job.
        done: called with each job's status as it ends (e.g. to rewrite partial reports).
    """
    launcher.check()
    if not specs:
        return []

    def report(status: dict[str, Any]) -> None:
        log(describe(status))
        if done is not None:
            done(status)

    if launcher.kind == "local" and launcher.jobs == 1:  # one after another; an error stops the sweep
        statuses = []
        for spec in specs:
            status = run_job(spec)
            report(status)
            statuses.append(status)
            if status["status"] == "stopped":  # asked to stop: the jobs after it do not start
                return statuses + [not_started(s) for s in specs[len(statuses):]]
        return statuses
    if launcher.kind == "local":
        return _local(specs, launcher.jobs, report)
    return _submitit(specs, launcher, log, report)


def describe(status: dict[str, Any]) -> str:
    """One line for a job's status."""
    name, seed = status.get("name"), status.get("seed")
    if status.get("status") == "done":
        final = status["rows"][-1]
        parts = [f"{name} seed {seed}: step {final['step']}"]
        if "accuracy" in final:
            parts.append(f"accuracy {100 * final['accuracy']:.1f}%")
        if "fd" in final:
            parts.append(f"FD {final['fd']:.2f}" + (f" (floor {final['floor']:.2f}" if "floor" in final else "")
                         + (f", guidance {final['guidance_scale']:g})" if "floor" in final else ""))
        parts.append(f"train {final['train_seconds']:.0f}s wall, {final['train_cpu_seconds']:.0f}s CPU")
        return "  ".join(parts)
    if status.get("status") == "stopped":
        return (f"{name} seed {seed}: stopped by {status.get('stopped_by')} at step {status.get('step')} of "
                f"{status.get('max_steps')} (checkpoint kept)")
    return f"{name} seed {seed}: failed: {status.get('error', 'unknown error')}"


def not_started(spec: RunSpec) -> dict[str, Any]:
    """The status of a job the launcher did not start because the sweep was asked to stop."""
    return {"status": "pending", "name": spec.name, "seed": spec.seed, "run_dir": spec.run_dir}


# - N processes on this machine -


def _slot_env(slot: int, jobs: int, device: str) -> dict[str, str]:
    """The environment of worker ``slot``: its share of the CPU threads, or its GPU."""
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DIFFIT_TOOLKIT_JOB_THREADS=str(threads))
    if device == "cuda":  # one GPU per process (round robin when there are more jobs than GPUs)
        import torch

        count = torch.cuda.device_count()
        if count:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % count)
    return env


def _local(specs: Sequence[RunSpec], jobs: int, report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """N worker processes at once, each running ``python -m diffit_toolkit.eval.jobs JOB.json``; a
    SIGTERM or Ctrl-C to this process is passed on to the workers, which checkpoint and stop."""
    statuses: dict[int, dict[str, Any]] = {}
    pending = list(enumerate(specs))
    running: dict[int, tuple[int, subprocess.Popen, RunSpec]] = {}  # slot -> (index, process, spec)
    stopping = {"signal": None}

    def forward(signum, _frame):  # stop launching; the workers checkpoint and report "stopped"
        stopping["signal"] = signum
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    try:
        while pending or running:
            for slot in range(jobs):
                if slot in running or not pending or stopping["signal"] is not None:
                    continue
                index, spec = pending.pop(0)
                run_dir = prepare_run_dir(spec)
                (run_dir / STATUS_FILE).unlink(missing_ok=True)
                spec_path = write_json(run_dir / "job_spec.json", spec.as_dict())
                with (run_dir / LOG_FILE).open("a") as log_fh:
                    proc = subprocess.Popen([sys.executable, "-m", "diffit_toolkit.eval.jobs", str(spec_path)],
                                            stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=_slot_env(slot, jobs, spec.device), start_new_session=True)
                running[slot] = (index, proc, spec)
            for slot, (index, proc, spec) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                status = _read_status(spec, proc.returncode)
                statuses[index] = status
                report(status)
            if not pending and not running:
                break
            if stopping["signal"] is not None and not running:
                break
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for index, spec in pending:
        statuses[index] = not_started(spec)
    return [statuses[i] for i in range(len(specs))]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _read_status(spec: RunSpec, returncode: int) -> dict[str, Any]:
    try:
        return json.loads((Path(spec.run_dir) / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    if returncode < 0 and -returncode in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        # stopped before its training loop listened for signals (while starting): nothing to lose
        from diffit_toolkit.runs import checkpoint_step, latest_checkpoint

        newest = latest_checkpoint(spec.run_dir) if (Path(spec.run_dir) / "checkpoints").is_dir() else None
        return {"status": "stopped", "stopped_by": signal.Signals(-returncode).name, "name": spec.name,
                "seed": spec.seed, "step": (checkpoint_step(newest) or 0) if newest else 0, "max_steps": "?",
                "run_dir": spec.run_dir}
    tail = _log_tail(Path(spec.run_dir) / LOG_FILE)
    return {"status": "failed", "name": spec.name, "seed": spec.seed,
            "error": f"the job process exited with code {returncode} ({tail}); see {Path(spec.run_dir) / LOG_FILE}"}


def _log_tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


# - submitit -


def make_executor(launcher: Launcher, folder: Path) -> Any:
    """The submitit executor of ``launcher``: SLURM (partition, time limit, GPUs, CPUs, the array's
    parallelism, the timeout signal two minutes ahead so a job requeues itself) or submitit's local one."""
    import submitit

    cluster = "local" if launcher.kind == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    cpus = launcher.cpus or (10 * launcher.gpus if launcher.gpus else 4)
    params: dict[str, Any] = dict(timeout_min=launcher.time_min, nodes=1, tasks_per_node=1, cpus_per_task=cpus,
                                  gpus_per_node=launcher.gpus, name="diffit-sweep")
    if cluster == "slurm":
        params.update(slurm_array_parallelism=launcher.jobs, slurm_signal_delay_s=120)
        if launcher.partition:
            params["slurm_partition"] = launcher.partition
    executor.update_parameters(**params)
    return executor


def _submitit(specs: Sequence[RunSpec], launcher: Launcher, log: Callable[[str], None],
              report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    folder = Path(launcher.folder or Path(specs[0].run_dir).parents[1] / "submitit")
    executor = make_executor(launcher, folder)
    for spec in specs:
        prepare_run_dir(spec)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DIFFIT_TOOLKIT_JOB_THREADS")}
    if launcher.kind == "submitit-local":  # the local executor starts every job at once: share the threads
        threads = str(max(1, (os.cpu_count() or 1) // len(specs)))
        os.environ.update({k: threads for k in saved})
    try:
        submitted = executor.map_array(RunJob(), [s.as_dict() for s in specs])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log(f"submitted {len(submitted)} jobs ({launcher.kind}): {submitted[0].job_id.split('_')[0]}; logs in {folder}")
    statuses = []
    for spec, job in zip(specs, submitted):
        try:
            status = job.result()
        except Exception as exc:  # noqa: BLE001 - submitit wraps the job's error with its traceback
            first = [line for line in str(exc).splitlines() if line.strip()]
            status = {"status": "failed", "name": spec.name, "seed": spec.seed,
                      "error": f"{first[-1] if first else type(exc).__name__}; see {job.paths.stderr}"}
        statuses.append(status)
        report(status)
    return statuses


# -- a job in its own process --------------------------------------------------------------------


def _main(argv: Sequence[str]) -> int:
    """``python -m diffit_toolkit.eval.jobs JOB.json``: run one job, write its status beside it."""
    spec = RunSpec(**json.loads(Path(argv[0]).read_text()))
    run_dir = Path(spec.run_dir)
    (run_dir / PID_FILE).write_text(str(os.getpid()))
    try:
        status = run_job(spec)
    except Exception as exc:  # noqa: BLE001 - reported as one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        status = {"status": "failed", "name": spec.name, "seed": spec.seed, "error": line}
    finally:
        (run_dir / PID_FILE).unlink(missing_ok=True)
    slim = {k: v for k, v in status.items() if k not in ("spec", "sweep_rows")}
    write_json(run_dir / STATUS_FILE, slim)
    return {"done": 0, "stopped": EXIT_STOPPED}.get(status["status"], 1)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
