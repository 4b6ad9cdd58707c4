"""A resumed run's TensorBoard logs: nothing lost, nothing twice.

A run (or a population's member) killed or preempted after a checkpoint at
weight step s resumes from s; read back with TensorBoard's own reader, its
logs must hold every scalar at exactly the steps, and with the values, of
the same run never interrupted. The checkpoints are placed on log steps and
between them (where hypergradients of the steps since the last log are
still buffered)."""
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import population
import processes
import train
from test_population import kill_population_after, members_of

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "configs" / "digits.yaml", ROOT / "configs" / "Ours_LR_Momentum.yaml"]
# Checkpoints at weight steps 6, 12, 18, ...: every other one on a log step (4, 8, 12, ...).
SETTINGS = {"network_weight_steps": 2, "log_interval": 4, "checkpoint_every": 3, "batch_size": 32,
            "device": "cpu"}


def logged(run_dir):
    """``{tag: [(step, value), ...]}`` of every scalar in ``run_dir``'s logs,
    as TensorBoard shows them (purged events gone)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def assert_same_logs(resumed_dir, whole_dir, rel=0.0):
    """The same tags, each at the same steps exactly once, with the same
    values (to ``rel``: a member resumed alone rounds as a run alone)."""
    resumed, whole = logged(resumed_dir), logged(whole_dir)
    assert sorted(resumed) == sorted(whole)
    assert any(tag.startswith("Hypergradient/") for tag in whole)
    steps = {tag: Counter(step for step, _ in resumed[tag]) for tag in whole}
    twice = {tag: [s for s, count in sorted(steps[tag].items()) if count > 1] for tag in whole}
    lost = {tag: sorted({s for s, _ in whole[tag]} - set(steps[tag])) for tag in whole}
    assert not any(twice.values()), f"logged twice, at weight steps: {({t: s for t, s in twice.items() if s})}"
    assert not any(lost.values()), f"lost, at weight steps: {({t: s for t, s in lost.items() if s})}"
    for tag in whole:
        (steps, values), (expected_steps, expected) = (zip(*sorted(logs[tag])) for logs in (resumed, whole))
        assert steps == expected_steps, tag
        assert values == pytest.approx(expected, rel=rel, abs=0.0), tag


def next_second():
    """Wait for the clock's next second: a resumed run's event file must sort
    after the interrupted one's (TensorBoard reads a directory's files in
    name order, ``events.out.tfevents.<seconds>.<host>.<pid>.<counter>``,
    in one second by pid and counter compared as text), else the
    interrupted run's events are read after the purge that hides them."""
    time.sleep(1.01 - time.time() % 1)


@pytest.mark.parametrize("checkpoint_every", [2, 3], ids=["checkpoints_on_log_steps",
                                                          "first_checkpoint_between_log_steps"])
def test_sigkilled_run_resumes_its_logs_without_losing_or_repeating_a_step(tmp_path, checkpoint_every):
    """A real kill -9 soon after a checkpoint, then the same run again on its
    directory (in this process, to spare a second start-up)."""
    settings = {**SETTINGS, "hyperparameter_steps": 150, "checkpoint_every": checkpoint_every}
    whole = train.main(SOURCES, settings, run_dir=tmp_path / "whole", progress=False)
    command = [sys.executable, str(ROOT / "train.py"), "-c", *map(str, SOURCES), "-q",
               "--run-dir", str(tmp_path / "killed"), "--set",
               *[f"{key}={value}" for key, value in settings.items()]]
    victim = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / train.CHECKPOINT
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / train.RESULTS).exists(), "killed too late to test resume"
    step = checkpoints.read(checkpoint, "checkpoint")["trainer"]["state"]["weight_step"]
    assert int(step) > 0
    next_second()
    resumed = train.main(SOURCES, settings, run_dir=tmp_path / "killed", progress=False)
    assert resumed["final"] == whole["final"]
    assert_same_logs(tmp_path / "killed", tmp_path / "whole")


def preempt_after(condition):
    """What SLURM's preemption signal does through ``executors.TrainingRun.checkpoint``:
    once ``condition()`` holds, ask the training loop (in this process) to
    save its state at the next step boundary and stop."""
    processes.preemption.reset()

    def request():
        deadline = time.time() + 120
        while not condition() and time.time() < deadline:
            time.sleep(0.005)
        processes.preemption.request_and_wait(120)

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("log_interval", [2, 4], ids=["log_every_step", "log_every_other_step"])
def test_preempted_run_resumes_its_logs_without_losing_or_repeating_a_step(tmp_path, log_interval):
    settings = {**SETTINGS, "hyperparameter_steps": 60, "checkpoint_every": 0,
                "log_interval": log_interval}
    train.main(SOURCES, settings, run_dir=tmp_path / "whole", progress=False)
    run_dir = tmp_path / "preempted"
    requester = preempt_after(lambda: any(run_dir.glob("events.out.tfevents.*")))
    try:
        with pytest.raises(processes.Preempted):
            train.main(SOURCES, settings, run_dir=run_dir, progress=False)
    finally:
        requester.join(10)
        processes.preemption.reset()
    assert (run_dir / train.CHECKPOINT).is_file() and not (run_dir / train.RESULTS).exists()
    next_second()
    train.main(SOURCES, settings, run_dir=run_dir, progress=False)
    assert_same_logs(run_dir, tmp_path / "whole")


@pytest.mark.parametrize("killed_at", [3, 6, 5], ids=["checkpoint_between_log_steps",
                                                      "checkpoint_on_a_log_step",
                                                      "logged_past_the_checkpoint"])
def test_killed_population_resumes_each_members_logs_exactly(tmp_path, monkeypatch, killed_at):
    """Members checkpoint at hyperparameter step 3 (weight step 6, between log
    steps: its hypergradients not yet written) and 6 (weight step 12, a log
    step); the population dies in the step after one of them, or after
    logging at weight step 8 (to be purged), then one member resumes alone
    and the other as a population."""
    settings = {**SETTINGS, "hyperparameter_steps": 10}
    population.main(SOURCES, members_of(2, 1, settings, tmp_path / "whole"), progress=False)
    killed = members_of(2, 1, settings, tmp_path / "killed")
    kill_population_after(killed_at, monkeypatch, SOURCES, killed)
    assert all((Path(m["run_dir"]) / train.CHECKPOINT).is_file() for m in killed)
    next_second()
    train.main(SOURCES, killed[0]["overrides"], run_dir=killed[0]["run_dir"], progress=False)
    population.main(SOURCES, killed[1:], progress=False)
    for k, rel in enumerate([1e-6, 0.0]):  # float32 logs: the member alone differs by an ulp
        assert_same_logs(tmp_path / "killed" / f"member_{k}", tmp_path / "whole" / f"member_{k}", rel)


def test_preempted_population_resumes_each_members_logs_exactly(tmp_path):
    settings = {**SETTINGS, "hyperparameter_steps": 60, "checkpoint_every": 0, "log_interval": 2}
    population.main(SOURCES, members_of(2, 1, settings, tmp_path / "whole"), progress=False)
    preempted = members_of(2, 1, settings, tmp_path / "preempted")
    first = Path(preempted[0]["run_dir"])
    requester = preempt_after(lambda: any(first.glob("events.out.tfevents.*")))
    try:
        with pytest.raises(processes.Preempted):
            population.main(SOURCES, preempted, progress=False)
    finally:
        requester.join(10)
        processes.preemption.reset()
    next_second()
    population.main(SOURCES, preempted, progress=False)
    for k in range(2):
        assert_same_logs(tmp_path / "preempted" / f"member_{k}", tmp_path / "whole" / f"member_{k}")
