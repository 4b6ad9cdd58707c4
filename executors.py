"""Where training runs execute: local worker processes or a SLURM cluster.

``parallel_exec.py`` and ``bayesopt.py`` both turn their work into a list of
*jobs* (plain dicts: config, overrides, run_dir, ...) and hand them to an
executor from :func:`make_executor`::

    executor = make_executor("local", folder, slurm_config=None, workers=2)
    handles = executor.map(TrainingRun(), jobs)
    for index, result in executor.as_completed(handles):
        ...   # result: train.main's dict, or {"status": "failed", "error": ...}

A run that fails is reported as a ``failed`` result and never stops the
others. On SLURM the callable is a :class:`submitit.helpers.Checkpointable`:
when a job is preempted or times out, submitit calls ``checkpoint()``, which
requeues the same job; the restarted job calls ``train.main`` with the *same*
``run_dir``, and the engine resumes from ``run_dir/checkpoint.pt``.

A *population* job (``{"config", "members": [{"overrides", "run_dir",
"name"}, ...], ...}``) runs its members as one vectorised computation
through ``population.main`` (:class:`PopulationRun`); its result is
one results dict per member, in order, and a failure is recorded for every
member it holds.
"""
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
import traceback
from pathlib import Path

import cloudpickle
import submitit
import yaml

import config as config_module
import processes
from errors import CommandLine, UserError  # noqa: F401 -- CommandLine is used by the launchers
from registry import closest

REPOSITORY = Path(__file__).resolve().parent
EXECUTORS = ("local", "slurm")
FAILED = "failed"
# How long a preempted job waits for the training loop to save its state.
PREEMPTION_WAIT_S = 60
DONE = ("finished", "diverged")
SLURM_JOB_FILE = "slurm_job_id"

# Our SLURM YAML keys -> (default, what it becomes for submitit's AutoExecutor).
SLURM_OPTIONS = {
    "partition": (None, "slurm_partition"),
    "timeout_min": (60, "timeout_min"),
    "timeout_min_per_algorithm": ({}, None),
    "gpus_per_node": (0, "gpus_per_node"),
    "cpus_per_task": (1, "cpus_per_task"),
    "mem_gb": (None, "mem_gb"),
    "array_parallelism": (256, "slurm_array_parallelism"),
    "max_num_timeout": (3, None),
    "signal_delay_s": (90, "slurm_signal_delay_s"),
    "account": (None, "slurm_account"),
    "qos": (None, "slurm_qos"),
    "constraint": (None, "slurm_constraint"),
    "setup": ([], "slurm_setup"),
    "additional_parameters": ({}, "slurm_additional_parameters"),
    "checkpoint_every": (None, None),
    "poll_interval_s": (5.0, None),
}


def one_line(error):
    """An exception as one short line, for summaries and error files."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:500]


def run_training(job):
    """Call ``train.main`` for one job dict; failures become a ``failed`` result.

    Catching here (inside the worker) is what lets one bad run be recorded
    while every other run goes on, locally and on SLURM alike.
    """
    run_dir = Path(job["run_dir"])
    threads = job.get("threads") or os.environ.get("SLURM_CPUS_PER_TASK")
    try:
        import torch
        if threads:
            torch.set_num_threads(int(threads))
        import train
        results = train.main(job["config"], job.get("overrides") or {}, run_dir=str(run_dir),
                             name=job.get("name"), group=job.get("group"), progress=False,
                             skip_if_done=True)
        (run_dir / "error.txt").unlink(missing_ok=True)
        return results
    except processes.Preempted as preempted:  # state saved; submitit requeues the job
        return {"status": "preempted", "error": str(preempted), "run_dir": str(run_dir)}
    except Exception as error:  # noqa: BLE001 -- recorded, the fan-out goes on
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir / "error.txt", traceback.format_exc())
        return {"status": FAILED, "error": one_line(error), "run_dir": str(run_dir)}


def finished_result(run_dir):
    """The saved results of a run that already ended (finished or diverged), else None."""
    try:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("status") in DONE else None


def record_failure(run_dir, text):
    """``error.txt`` in a run directory; never raises (the fan-out goes on)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(run_dir) / "error.txt", text)
    except OSError:
        pass


def run_population(job):
    """Call ``population.main`` for one population job; returns one
    result per member, in order.

    Members that already ended (a requeued SLURM task whose population wrote
    some results before it was stopped) are not trained again: their saved
    results are returned. If the population fails as a whole, every member it
    was training gets ``error.txt`` and a ``failed`` result, and the fan-out
    goes on.
    """
    members = job["members"]
    results = [finished_result(member["run_dir"]) for member in members]
    todo = [index for index, result in enumerate(results) if result is None]
    threads = job.get("threads") or os.environ.get("SLURM_CPUS_PER_TASK")
    try:
        import torch
        if threads:
            torch.set_num_threads(int(threads))
        import population
        if todo:
            trained = population.main(job["config"], [members[index] for index in todo],
                                      group=job.get("group"), progress=False)
            if len(trained) != len(todo):
                raise RuntimeError(f"population.main returned {len(trained)} results "
                                   f"for {len(todo)} members")
            for index, result in zip(todo, trained):
                results[index] = result
                Path(members[index]["run_dir"], "error.txt").unlink(missing_ok=True)
    except processes.Preempted as preempted:  # members' states saved; submitit requeues the job
        return [{"status": "preempted", "error": str(preempted), "run_dir": member["run_dir"]}
                for member in members]
    except Exception as error:  # noqa: BLE001 -- recorded for each member, the fan-out goes on
        text = traceback.format_exc()
        for index in todo:
            record_failure(members[index]["run_dir"], text)
            results[index] = {"status": FAILED, "error": one_line(error),
                              "run_dir": members[index]["run_dir"]}
    return results


class TrainingRun(submitit.helpers.Checkpointable):
    """The callable every executor runs: one training run per call.

    On SLURM, submitit calls ``checkpoint()`` from its handler of the
    preemption/time-out signal, then requeues the job. The run trains in a
    thread of its own there, so ``checkpoint()`` can ask the training loop to
    write its current state at the next hyperparameter step and wait for it
    (at most ``PREEMPTION_WAIT_S``, else the last periodic checkpoint serves);
    the requeued job resumes from ``run_dir/checkpoint.pt``.
    """

    def __call__(self, job):
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            processes.preemption.reset()
            return processes.run_in_thread(run_training, job)
        return run_training(job)

    def checkpoint(self, *args, **kwargs):
        processes.preemption.request_and_wait(PREEMPTION_WAIT_S)
        return super().checkpoint(*args, **kwargs)


class PopulationRun(TrainingRun):
    """The callable for a population job: its members trained as one
    vectorised computation. On preemption ``checkpoint()`` asks the
    population's loop to write every member's current state (as
    :class:`TrainingRun` does for one run), then submitit requeues the same
    call and ``population.main`` resumes each member from its
    ``run_dir/checkpoint.pt``."""

    def __call__(self, job):
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            processes.preemption.reset()
            return processes.run_in_thread(run_population, job)
        return run_population(job)


def run_directories(job):
    """The run directories a job writes: its own, or its population members'."""
    if job.get("members") is not None:
        return [member["run_dir"] for member in job["members"] if member.get("run_dir")]
    return [job["run_dir"]] if job.get("run_dir") else []


def finished(result):
    """A handle that is already done, for a run whose results were found on disk."""
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


def write_atomically(path, text):
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- local


def _serve(connection):
    """Main loop of a spawned worker process: run jobs sent by the parent until
    the pipe closes. Reusing the process for many runs pays the torch import
    once per worker, not once per run. The worker dies with its parent, so a
    killed launcher leaves no run training on behind its back."""
    processes.die_with_parent(multiprocessing.parent_process().pid)
    while True:
        try:
            payload = connection.recv_bytes()
        except (EOFError, OSError):
            return
        function, argument = cloudpickle.loads(payload)
        try:
            reply = ("ok", function(argument))
        except BaseException as error:  # noqa: BLE001 -- reported to the parent
            reply = ("error", one_line(error))
        connection.send_bytes(cloudpickle.dumps(reply))


class LocalExecutor:
    """Up to ``workers`` runs at once, each worker a spawned process of its own.

    Each worker thread owns one long-lived process and waits on it, so a run
    that crashes its process hard (segfault, OOM killer) fails alone -- the
    thread starts a fresh process for its next run -- instead of breaking a
    shared pool for every run still waiting.
    """

    def __init__(self, workers):
        self.workers = workers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        self._context = multiprocessing.get_context("spawn")
        self._local = threading.local()
        self._processes = []
        self._lock = threading.Lock()
        self._stopping = False

    def _worker(self):
        """This thread's worker process and pipe, started on first use or after a crash."""
        worker = getattr(self._local, "worker", None)
        if worker is not None and worker[0].is_alive():
            return worker
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_serve, args=(child_end,), daemon=True)
        with self._lock:
            process.start()
            self._processes.append((process, parent_end))
        child_end.close()
        self._local.worker = (process, parent_end)
        return self._local.worker

    def _run_in_process(self, function, argument):
        if self._stopping:
            return {"status": FAILED, "error": "cancelled", "run_dir": argument.get("run_dir")}
        process, connection = self._worker()
        try:
            connection.send_bytes(cloudpickle.dumps((function, argument)))
            status, value = cloudpickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            process.join(timeout=5)
            status = "error"
            value = f"worker process died without a result (exit code {process.exitcode})"
        if status == "ok":
            return value
        return {"status": FAILED, "error": value, "run_dir": argument.get("run_dir")}

    def map(self, function, jobs, label=None):
        """Start every job; one future per job, in order. Each run gets its
        share of the cores, so ``workers`` runs do not oversubscribe them."""
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        return [self._pool.submit(self._run_in_process, function, {"threads": threads, **job})
                for job in jobs]

    def as_completed(self, handles):
        """``(index, result)`` pairs in completion order."""
        index_of = {handle: index for index, handle in enumerate(handles)}
        for handle in concurrent.futures.as_completed(handles):
            yield index_of[handle], handle.result()

    def wait_any(self, handles):
        """Block until at least one handle is done; its ``(handle, result)`` pairs."""
        done, _ = concurrent.futures.wait(handles, return_when=concurrent.futures.FIRST_COMPLETED)
        return [(handle, handle.result()) for handle in handles if handle in done]

    def shutdown(self):
        """Cancel queued runs, close the pipes (idle workers exit), stop busy ones."""
        self._stopping = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for process, connection in self._processes:
                connection.close()
                process.join(timeout=2)
                if process.is_alive():
                    process.terminate()


# ----------------------------------------------------------------------------- slurm


def read_slurm_config(source):
    """SLURM settings from a YAML path, a mapping or None, with defaults filled in.

    Unknown keys are rejected with the valid ones and their defaults, as
    submitit itself does."""
    where = "slurm settings"
    if source is None:
        data = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        where = str(source)
        path = Path(source)
        text = config_module.read_text(path, "SLURM settings file")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{path}: malformed YAML: {one_line(error)}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: must contain a mapping of SLURM options")
    for key in data:
        if key not in SLURM_OPTIONS:
            valid = ", ".join(f"{name}={default!r}" for name, (default, _) in SLURM_OPTIONS.items())
            raise UserError(f"{where}: unknown SLURM option '{key}'{closest(key, SLURM_OPTIONS)}; "
                            f"valid options: {valid}")
    settings = {key: default for key, (default, _) in SLURM_OPTIONS.items()}
    settings.update(data)
    return settings


def timeout_for(settings, label):
    """Time limit (minutes) for one algorithm: ``timeout_min_per_algorithm`` wins.

    Keys may end in ``*`` to match a prefix (``LongDiffThroughOpt_*``)."""
    per_algorithm = settings.get("timeout_min_per_algorithm") or {}
    if label in per_algorithm:
        return int(per_algorithm[label])
    for pattern, minutes in per_algorithm.items():
        if pattern.endswith("*") and label and label.startswith(pattern[:-1]):
            return int(minutes)
    return int(settings["timeout_min"])


def submitit_parameters(settings, label=None):
    """The ``AutoExecutor.update_parameters`` keywords for one array of jobs."""
    parameters = {}
    for key, (_, target) in SLURM_OPTIONS.items():
        value = settings.get(key)
        if target is None or value is None or value == [] or value == {}:
            continue
        parameters[target] = value
    parameters["timeout_min"] = timeout_for(settings, label)
    parameters["name"] = f"hypergrad-{label}" if label else "hypergrad"
    # Jobs unpickle TrainingRun from this repository, wherever sbatch starts them.
    parameters["slurm_setup"] = [f"export PYTHONPATH={REPOSITORY}:${{PYTHONPATH:-}}",
                                 *parameters.get("slurm_setup", [])]
    return parameters


def sbatch_text(settings, label=None, folder="slurm_logs", array_size=None):
    """The sbatch script submitit writes for one job array of ``label``, built
    by submitit's own code from our settings (for checks and dry runs; needs
    no cluster)."""
    from submitit.slurm import slurm as submitit_slurm

    equivalent = submitit_slurm.SlurmExecutor._equivalence_dict()
    options = {}
    for key, value in submitit_parameters(settings, label).items():
        if key.startswith("slurm_"):
            options[key[len("slurm_"):]] = value
        elif key in equivalent:
            options[equivalent[key]] = value
    if "mem" in options:
        options["mem"] = submitit_slurm._convert_mem(options["mem"])
    if array_size:
        options["map_count"] = int(array_size)
    try:
        return submitit_slurm._make_sbatch_string(
            command="python -u -m submitit.core._submit", folder=str(folder), **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"slurm settings: {one_line(error)}") from None


def active_slurm_job(run_dir):
    """The SLURM job id still queued or running for ``run_dir`` (from an earlier
    submission whose submitter went away), or None."""
    path = Path(run_dir) / SLURM_JOB_FILE
    if not path.is_file() or shutil.which("squeue") is None:
        return None
    job_id = path.read_text().strip()
    try:
        answer = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", job_id], capture_output=True,
                                text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    active = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD")
    for line in answer.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] in active:
            return job_id
    return None


def check_slurm_reachable():
    """A one-line :class:`UserError` unless SLURM's controller answers."""
    if shutil.which("sinfo") is None or shutil.which("srun") is None:
        raise UserError("SLURM is unreachable: 'sinfo'/'srun' not found on PATH "
                        "(start a local cluster with slurm/local-cluster.sh start, or use --executor local)")
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True,
                                timeout=30)
    except subprocess.TimeoutExpired:
        raise UserError("SLURM is unreachable: 'sinfo' did not answer within 30 s") from None
    if answer.returncode != 0:
        message = " ".join((answer.stderr or answer.stdout).split())[:300]
        raise UserError(f"SLURM is unreachable: sinfo failed: {message}")


class SlurmExecutor:
    """SLURM job arrays through submitit's ``AutoExecutor.map_array``."""

    def __init__(self, folder, settings):
        check_slurm_reachable()
        self.settings = settings
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm",
                                               slurm_max_num_timeout=int(settings["max_num_timeout"]))
        self.update(None)

    def update(self, label):
        """Set the sbatch options for the next array (time limit per algorithm)."""
        try:
            self._executor.update_parameters(**submitit_parameters(self.settings, label))
        except (ValueError, NameError, AssertionError) as error:
            raise UserError(f"slurm settings: {one_line(error)}") from None

    def map(self, function, jobs, label=None):
        """Submit ``jobs`` as one SLURM job array; one submitit Job per job."""
        if not jobs:
            return []
        self.update(label)
        try:
            handles = self._executor.map_array(function, jobs)
        except subprocess.CalledProcessError as error:
            output = error.output.decode() if isinstance(error.output, bytes) else error.output
            raise UserError(f"sbatch refused the job array: {' '.join(str(output).split())[:300]}") from None
        for job, handle in zip(jobs, handles):
            for run_dir in run_directories(job):
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                write_atomically(Path(run_dir) / SLURM_JOB_FILE, f"{handle.job_id}\n")
        return handles

    def attach(self, job_id):
        """A handle on a job submitted earlier from this folder (by a submitter
        that went away), to wait for it instead of submitting it twice."""
        return submitit.SlurmJob(folder=self.folder / "%j", job_id=str(job_id))

    @staticmethod
    def result(handle):
        """A finished job's result; a job that died becomes a ``failed`` result."""
        try:
            return handle.result()
        except Exception as error:  # noqa: BLE001 -- one dead job never stops the rest
            return {"status": FAILED, "error": f"SLURM job {handle.job_id}: {one_line(error)}",
                    "run_dir": None}

    def as_completed(self, handles):
        """``(index, result)`` pairs as jobs finish."""
        index_of = {handle.job_id: index for index, handle in enumerate(handles)}
        for handle in submitit.helpers.as_completed(
                handles, poll_frequency=float(self.settings["poll_interval_s"])):
            yield index_of[handle.job_id], self.result(handle)

    def wait_any(self, handles):
        """Block until at least one job is done; its ``(handle, result)`` pairs."""
        while True:
            done = [handle for handle in handles if handle.done()]
            if done:
                return [(handle, self.result(handle)) for handle in done]
            time.sleep(float(self.settings["poll_interval_s"]))

    def shutdown(self):
        """Nothing to stop locally: SLURM jobs keep running and a re-run picks them up."""


def make_executor(kind, folder, slurm_config=None, workers=None):
    """``local`` (``workers`` processes) or ``slurm`` (settings from ``slurm_config``)."""
    if kind == "local":
        workers = int(workers or os.cpu_count() or 1)
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        return LocalExecutor(workers)
    if kind == "slurm":
        return SlurmExecutor(folder, read_slurm_config(slurm_config))
    raise UserError(f"unknown executor '{kind}'{closest(kind, EXECUTORS)}; valid: {', '.join(EXECUTORS)}")
