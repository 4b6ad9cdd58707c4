"""SLURM through submitit, against a real one-node cluster (slurm/local-cluster.sh).

The sbatch-option tests need no cluster. The others need SLURM: CI starts it
with ``slurm/local-cluster.sh start``; locally they are skipped when ``sinfo``
is not installed, and the fixture starts the cluster when it is installed
but not running (as root).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import executors
import parallel_exec
from errors import UserError

REPOSITORY = Path(__file__).resolve().parents[1]
ENERGY = str(REPOSITORY / "configs" / "uci_energy.yaml")
LOCAL_SLURM = str(REPOSITORY / "slurm" / "local.yaml")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running SLURM whose node is idle; skip when SLURM is not installed here."""
    # CI sets HYPERGRAD_REQUIRE_SLURM=1 after starting the cluster: there a
    # missing SLURM is a failure, never a silent skip.
    unavailable = pytest.fail if os.environ.get("HYPERGRAD_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("sinfo") is None:
        unavailable("SLURM not installed here: run `slurm/local-cluster.sh start` (CI does)")
    script = REPOSITORY / "slurm" / "local-cluster.sh"
    if subprocess.run(["bash", str(script), "status"], capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            unavailable("SLURM installed but not running, and starting it needs root")
        subprocess.run(["bash", str(script), "start"], check=True, timeout=300)
    os.environ.setdefault("HYPERGRAD_DATA", str(REPOSITORY.parent / "shared" / "data"))


# ------------------------------------------------------------------ no cluster needed

def test_sbatch_options_come_from_yaml():
    settings = executors.read_slurm_config(REPOSITORY / "slurm" / "cifar10.yaml")
    script = executors.sbatch_text(settings, "LongDiffThroughOpt_UCI_Full", folder="/logs", array_size=50)
    assert "#SBATCH --partition=gpu" in script
    assert "#SBATCH --time=1440" in script  # the LongDiffThroughOpt_* limit
    assert "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --mem=32GB" in script
    assert "#SBATCH --array=0-49%32" in script  # array parallelism
    assert "#SBATCH --signal=USR2@90" in script
    assert f"export PYTHONPATH={REPOSITORY}:" in script
    assert "export HYPERGRAD_DATA=" in script
    assert "#SBATCH --time=240" in executors.sbatch_text(settings, "Random")
    assert "#SBATCH --time=480" in executors.sbatch_text(settings, "Ours_LR")  # the default


def test_every_shipped_slurm_file_is_valid():
    for path in sorted((REPOSITORY / "slurm").glob("*.yaml")):
        executors.sbatch_text(executors.read_slurm_config(path), "Random", array_size=3)


def test_unknown_slurm_option_lists_valid_ones_with_defaults():
    with pytest.raises(UserError) as error:
        executors.read_slurm_config({"partion": "gpu"})
    message = str(error.value)
    assert "unknown SLURM option 'partion'" in message and "did you mean 'partition'" in message
    assert "timeout_min=60" in message and "array_parallelism=256" in message


def test_unreachable_slurm_is_one_line_exit_2(tmp_path):
    environment = {**os.environ, "PATH": str(tmp_path)}  # no sinfo, no srun
    answer = subprocess.run(
        [sys.executable, str(REPOSITORY / "parallel_exec.py"), "-c", ENERGY, "--algorithms", "Random",
         "--repetitions", "1", "--executor", "slurm", "-l", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120)
    assert answer.returncode == 2
    assert answer.stderr.startswith("error: SLURM is unreachable")
    assert answer.stderr.count("\n") == 1


ACCOUNTING_DOWN = "sacct: error: Problem talking to the database: Unable to connect to database"
CLUSTER_STATES = {  # what sacct answers, which of the script's daemons are dead
    "healthy": ("exit 0", []),
    "database_down": (f"echo '{ACCOUNTING_DOWN}' >&2; exit 1", ["mysql/mariadb.pid"]),
    "slurmdbd_dead": ("echo 'sacct: error: slurm_persist_conn_open_without_init: failed to open "
                      "persistent connection to host:127.0.0.1:6819: Connection refused' >&2; exit 1",
                      ["run/slurmdbd.pid"]),
}


@pytest.mark.parametrize("state", sorted(CLUSTER_STATES))
def test_cluster_status_checks_accounting_too(tmp_path, state):
    """``local-cluster.sh status`` on stand-ins for the SLURM commands (first on
    PATH) and a state directory of pid files (live: this process; dead: a
    finished one): the real daemons are not touched. The node answering is
    not enough: a dead accounting database (submitit's job tracking) is down."""
    sacct, dead = CLUSTER_STATES[state]
    commands = {"sinfo": "echo idle", "munge": "echo credential", "unmunge": "cat >/dev/null",
                "sacct": sacct}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    finished = subprocess.Popen(["true"])
    finished.wait()
    for pid_file in ("mysql/mariadb.pid", "run/slurmdbd.pid", "run/slurmctld.pid", "run/slurmd.pid"):
        (tmp_path / "state" / pid_file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "state" / pid_file).write_text(f"{finished.pid if pid_file in dead else os.getpid()}\n")
    environment = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin",
                   "HYPERGRAD_SLURM_STATE": str(tmp_path / "state")}
    answer = subprocess.run(["bash", "slurm/local-cluster.sh", "status"], capture_output=True, text=True,
                            env=environment, cwd=REPOSITORY, timeout=60)
    if state == "healthy":
        assert answer.returncode == 0 and answer.stdout == "idle\n"
        assert answer.stderr == "local-cluster: up: node idle, accounting answers\n"
        return
    assert answer.returncode == 1 and answer.stdout == ""
    assert answer.stderr.count("\n") == 1, answer.stderr
    assert answer.stderr.startswith("local-cluster: down: accounting does not answer (sacct: error: ")
    assert f"not running: {'MariaDB' if state == 'database_down' else 'slurmdbd'};" in answer.stderr
    assert answer.stderr.endswith("; fix: bash slurm/local-cluster.sh stop; bash slurm/local-cluster.sh start\n")


# ------------------------------------------------------------------ real cluster

def sacct_states(job_ids):
    """``{job_id: state}`` from SLURM accounting, for array tasks ``A_i``."""
    output = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                            capture_output=True, text=True, check=True).stdout
    return dict(line.split("|")[:2] for line in output.split())


def assert_preempted_and_requeued(log_dir, job_id):
    """submitit caught the preemption signal and checkpointed, and SLURM's
    accounting holds the first (requeued) start as well as the last."""
    logs = "".join(path.read_text() for path in log_dir.rglob("*_log.*"))
    assert "this job is preempted" in logs and "Calling checkpoint method" in logs
    output = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "JobID,State", "-j", job_id],
                            capture_output=True, text=True, check=True).stdout
    states = [line.split("|")[1] for line in output.split()]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", output


def test_fanout_runs_as_a_job_array(slurm_cluster, tmp_path):
    arguments = ["-c", ENERGY, "--algorithms", "Random", "Ours_LR", "--repetitions", "2",
                 "--executor", "slurm", "--slurm", LOCAL_SLURM, "-l", str(tmp_path), "-g", "array",
                 "--set", "hyperparameter_steps=20", "--no-progress"]
    assert parallel_exec.main(arguments) == 0
    summary = json.loads((tmp_path / "array" / "summary.json").read_text())
    assert summary["counts"] == {"finished": 4} and summary["launched"] == 4
    for line in summary["runs"]:
        results = json.loads((Path(line["run_dir"]) / "results.json").read_text())
        assert results["status"] == "finished"
        assert results["hyperparameter_steps_done"] == 20
        assert 0 < results["final"]["Loss/Test"] < 10
    # Both repetitions of both algorithms started from the same generated points.
    configs = {(line["algorithm"], line["repetition"]): (Path(line["run_dir"]) / "config.yaml").read_text()
               for line in summary["runs"]}
    for repetition in range(2):
        random_lr = [l for l in configs[("Random", repetition)].splitlines() if l.strip().startswith("lr:")]
        ours_lr = [l for l in configs[("Ours_LR", repetition)].splitlines() if l.strip().startswith("lr:")]
        assert random_lr[0] == ours_lr[0]
    # SLURM's own accounting saw the array tasks complete.
    logs = tmp_path / "array" / "slurm_logs"
    job_ids = sorted(path.name for path in logs.iterdir() if re.fullmatch(r"\d+_\d+", path.name))
    assert len(job_ids) == 4
    # (the result file lands a moment before SLURM marks the task completed)
    wait_for(lambda: set(sacct_states(job_ids).values()) == {"COMPLETED"}, 60,
             "SLURM accounting to show every array task COMPLETED")
    # A second invocation finds everything done and submits nothing.
    assert parallel_exec.main(arguments) == 0
    summary = json.loads((tmp_path / "array" / "summary.json").read_text())
    assert summary["launched"] == 0 and summary["skipped"] == 4


def wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.2)


def test_preempted_job_requeues_and_resumes_to_the_same_result(slurm_cluster, tmp_path):
    import train

    stack = [ENERGY, str(REPOSITORY / "configs" / "Ours_LR_Momentum.yaml")]
    overrides = {"hyperparameter_steps": 800, "checkpoint_every": 50, "seed": 3,
                 "network_weight.lr": -2.5, "network_weight.momentum": 0.0}
    job = {"config": stack, "overrides": overrides, "run_dir": str(tmp_path / "interrupted")}
    executor = executors.make_executor("slurm", tmp_path / "logs", slurm_config=LOCAL_SLURM)
    [handle] = executor.map(executors.TrainingRun(), [job], label="Ours_LR_Momentum")
    checkpoint = tmp_path / "interrupted" / "checkpoint.pt"
    wait_for(checkpoint.exists, 180, "the job's first checkpoint")
    handle._interrupt()  # preemption: SIGTERM, then USR2 -> checkpoint() -> requeue
    results = handle.result()
    # The uninterrupted reference, in this process.
    reference = train.main(stack, overrides, run_dir=str(tmp_path / "reference"), progress=False)
    assert results["status"] == "finished"
    assert results["hyperparameter_steps_done"] == 800
    for key in ("Loss/Training", "Loss/Validation", "Loss/Test"):
        assert results["final"][key] == pytest.approx(reference["final"][key], rel=1e-4, abs=1e-7)
    for key in ("lr", "weight_decay", "momentum"):
        assert results["hyperparameters"][key] == pytest.approx(reference["hyperparameters"][key], rel=1e-4)
    assert_preempted_and_requeued(tmp_path / "logs", handle.job_id)


def test_bayesopt_trials_run_on_slurm(slurm_cluster, tmp_path):
    import bayesopt

    best = bayesopt.main(["-c", ENERGY, str(REPOSITORY / "configs" / "Random_Validation_BayesOpt.yaml"),
                          "--trials", "3", "--initial", "3", "--parallel", "3", "--executor", "slurm",
                          "--slurm", LOCAL_SLURM, "-l", str(tmp_path), "--set", "hyperparameter_steps=10",
                          "--no-progress"])
    directory = tmp_path / "bayesopt" / "uci_energy" / "Random_Validation_BayesOpt"
    assert best["completed_trials"] == 3
    job_ids = [(directory / f"trial_{k}" / "slurm_job_id").read_text().strip() for k in range(3)]
    wait_for(lambda: set(sacct_states(job_ids).values()) == {"COMPLETED"}, 60, "the trials' SLURM jobs")


def test_rerun_waits_for_runs_still_on_slurm_instead_of_resubmitting(slurm_cluster, tmp_path):
    arguments = ["-c", ENERGY, "--algorithms", "Random", "--repetitions", "2", "--executor", "slurm",
                 "--slurm", LOCAL_SLURM, "-l", str(tmp_path), "-g", "again",
                 "--set", "hyperparameter_steps=1500", "--no-progress"]
    # A submitter that goes away (killed) right after submitting.
    submitter = subprocess.Popen([sys.executable, str(REPOSITORY / "parallel_exec.py"), *arguments],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks = [tmp_path / "again" / "uci_energy" / "Random" / f"rep_{k}" / "slurm_job_id" for k in range(2)]
    wait_for(lambda: all(mark.exists() for mark in marks), 120, "the job array to be submitted")
    submitter.kill()
    submitter.wait()
    # The same command again waits for those jobs instead of submitting them twice.
    assert parallel_exec.main(arguments) == 0
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["launched"] == 0 and summary["reattached"] == 2
    assert summary["counts"] == {"finished": 2}
    job_ids = [mark.read_text().strip() for mark in marks]
    output = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "JobID", "-j", ",".join(job_ids)],
                            capture_output=True, text=True, check=True).stdout
    assert sorted(output.split()) == sorted(job_ids)  # each run ran once, as one job


def logged_steps(path):
    """The weight steps at which one event file logged ``Loss/Training``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [event.step for event in EventFileLoader(str(path)).Load()
            for value in event.summary.value if value.tag == "Loss/Training"]


def test_preemption_checkpoints_the_current_step_not_the_last_periodic_one(slurm_cluster, tmp_path):
    """No periodic checkpoints at all: what the requeued job resumes from is
    the state written when the preemption signal came."""
    stack = [ENERGY, str(REPOSITORY / "configs" / "Ours_LR_Momentum.yaml")]
    weight_steps = 10  # per hyperparameter step; logged at every hyperparameter step
    overrides = {"hyperparameter_steps": 1500, "checkpoint_every": 0, "log_interval": weight_steps,
                 "network_weight_steps": weight_steps, "seed": 4}
    run_dir = tmp_path / "preempted"
    job = {"config": stack, "overrides": overrides, "run_dir": str(run_dir)}
    executor = executors.make_executor("slurm", tmp_path / "logs", slurm_config=LOCAL_SLURM)
    [handle] = executor.map(executors.TrainingRun(), [job], label="Ours_LR_Momentum")
    wait_for(lambda: any(run_dir.glob("events.out.tfevents.*")), 180, "the job to start training")
    time.sleep(3)  # well into training
    handle._interrupt()  # preemption: SIGTERM, then USR2 -> checkpoint() -> requeue
    results = handle.result()
    assert results["status"] == "finished" and results["hyperparameter_steps_done"] == 1500
    first, resumed = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    before, after = logged_steps(first), logged_steps(resumed)
    assert before and after and after[-1] == 1500 * weight_steps
    resumed_from = after[0] - weight_steps  # the weight step of the checkpoint
    assert resumed_from > 0, "resumed from scratch: the preemption wrote no checkpoint"
    lost = (before[-1] - resumed_from) / weight_steps  # hyperparameter steps done twice
    assert lost <= 1, (before[-1], resumed_from)
    logs = "".join(path.read_text() for path in (tmp_path / "logs").rglob("*_log.*"))
    assert "this job is preempted" in logs and "Calling checkpoint method" in logs


def test_populations_run_as_one_array_task_each(slurm_cluster, tmp_path):
    arguments = ["-c", ENERGY, "--algorithms", "Random", "Ours_LR", "--repetitions", "3",
                 "--population-size", "2", "--executor", "slurm", "--slurm", LOCAL_SLURM,
                 "-l", str(tmp_path), "-g", "populations", "--set", "hyperparameter_steps=20",
                 "--no-progress"]
    assert parallel_exec.main(arguments) == 0
    summary = json.loads((tmp_path / "populations" / "summary.json").read_text())
    assert summary["counts"] == {"finished": 6} and summary["launched"] == 6
    assert [(p["algorithm"], p["repetitions"]) for p in summary["populations"]] == [
        ("Random", [0, 1]), ("Random", [2]), ("Ours_LR", [0, 1]), ("Ours_LR", [2])]
    job_of = {}
    for line in summary["runs"]:
        run_dir = Path(line["run_dir"])
        assert run_dir == (tmp_path / "populations" / "uci_energy" / line["algorithm"]
                           / f"rep_{line['repetition']}").resolve()
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "finished" and results["hyperparameter_steps_done"] == 20
        job_of[(line["algorithm"], line["repetition"])] = (run_dir / executors.SLURM_JOB_FILE).read_text().strip()
    # One array task per population: its members share the task, the populations do not.
    for algorithm in ("Random", "Ours_LR"):
        assert job_of[(algorithm, 0)] == job_of[(algorithm, 1)] != job_of[(algorithm, 2)]
    job_ids = sorted(set(job_of.values()))
    assert len(job_ids) == 4 and all(re.fullmatch(r"\d+_\d+", job_id) for job_id in job_ids)
    wait_for(lambda: set(sacct_states(job_ids).values()) == {"COMPLETED"}, 60,
             "SLURM accounting to show every population's array task COMPLETED")
    assert parallel_exec.main(arguments) == 0  # everything done: nothing submitted
    summary = json.loads((tmp_path / "populations" / "summary.json").read_text())
    assert summary["launched"] == 0 and summary["skipped"] == 6


def test_preempted_population_requeues_and_resumes_to_the_same_results(slurm_cluster, tmp_path):
    import population
    stack = [ENERGY, str(REPOSITORY / "configs" / "Ours_LR_Momentum.yaml")]
    common = {"hyperparameter_steps": 400, "checkpoint_every": 20}
    overrides = [{**common, "seed": seed, "network_weight.lr": lr}
                 for seed, lr in ((3, -2.5), (4, -3.0), (5, -2.0))]
    members = [{"overrides": o, "run_dir": str(tmp_path / f"member_{k}"), "name": None}
               for k, o in enumerate(overrides)]
    executor = executors.make_executor("slurm", tmp_path / "logs", slurm_config=LOCAL_SLURM)
    [handle] = executor.map(executors.PopulationRun(), [{"config": stack, "members": members}],
                            label="Ours_LR_Momentum")
    assert all((tmp_path / f"member_{k}" / executors.SLURM_JOB_FILE).read_text().strip() == handle.job_id
               for k in range(3))
    wait_for(lambda: all((tmp_path / f"member_{k}" / "checkpoint.pt").exists() for k in range(3)), 180,
             "the population's first checkpoints")
    handle._interrupt()  # preemption: SIGTERM, then USR2 -> checkpoint() -> requeue
    results = handle.result()
    # The uninterrupted population, in this process (population against runs alone is
    # test_population_fanout's and the engine's tests' business).
    reference = population.main(stack, [{**m, "run_dir": str(tmp_path / f"reference_{k}")}
                                         for k, m in enumerate(members)], progress=False)
    assert [r["run_dir"] for r in results] == [m["run_dir"] for m in members]
    for got, expected in zip(results, reference):
        assert got["status"] == "finished" and got["hyperparameter_steps_done"] == 400
        for key in ("Loss/Training", "Loss/Validation", "Loss/Test"):
            assert got["final"][key] == pytest.approx(expected["final"][key], rel=1e-6, abs=1e-9)
    assert_preempted_and_requeued(tmp_path / "logs", handle.job_id)
