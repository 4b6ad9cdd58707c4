"""bayesopt.py with real Ax: search-space parsing, a BO run that is killed
after 4 completed trials and resumed to 8 without repeating any, and errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bayesopt
import generators
from errors import UserError

REPOSITORY = Path(__file__).resolve().parents[1]
ENERGY = str(REPOSITORY / "configs" / "uci_energy.yaml")
BAYESOPT = str(REPOSITORY / "configs" / "Random_Validation_BayesOpt.yaml")


def search(**arguments):
    namespace = bayesopt.build_parser().parse_args(["-c", ENERGY, *sum(
        ([f"--{key}", str(value)] for key, value in arguments.items()), [])])
    return bayesopt.read_search(None, namespace)


def test_default_search_space_is_the_papers():
    space = search()
    assert space["trials"] == 30 and space["initial"] == 5
    assert space["parameters"]["network_weight.lr"] == {"bounds": [-6.0, -1.0], "store": "as_is"}
    assert space["parameters"]["network_weight.weight_decay"]["bounds"] == [-7.0, -2.0]
    assert space["parameters"]["network_weight.momentum"] == {"bounds": [0.0, 1.0], "store": "logit"}


def test_parameters_map_to_stored_overrides():
    space = search()
    overrides = bayesopt.overrides_for({"network_weight__lr": -3.0, "network_weight__weight_decay": -5.5,
                                        "network_weight__momentum": 0.9}, space)
    assert overrides["network_weight.lr"] == -3.0
    assert overrides["network_weight.weight_decay"] == -5.5
    assert overrides["network_weight.momentum"] == pytest.approx(generators.logit(0.9))
    assert 1 / (1 + math.exp(-overrides["network_weight.momentum"])) == pytest.approx(0.9)


def test_search_yaml_bounds_and_budget(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("trials: 12\ninitial: 3\nparameters:\n  network_weight.lr: [-4, -2]\n")
    namespace = bayesopt.build_parser().parse_args(["-c", ENERGY, "--search", str(path), "--initial", "2"])
    space = bayesopt.read_search(str(path), namespace)
    assert space["trials"] == 12 and space["initial"] == 2  # the command line wins
    assert list(space["parameters"]) == ["network_weight.lr"]
    path.write_text("trails: 12\n")
    with pytest.raises(UserError, match="unknown key 'trails'.*did you mean 'trials'"):
        bayesopt.read_search(str(path), namespace)
    path.write_text("parameters:\n  network_weight.lr: [-1, -4]\n")
    with pytest.raises(UserError, match="low < high"):
        bayesopt.read_search(str(path), namespace)


def test_bad_budget_is_one_line_exit_2(tmp_path):
    answer = subprocess.run([sys.executable, str(REPOSITORY / "bayesopt.py"), "-c", ENERGY, BAYESOPT,
                             "--trials", "0", "-l", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 2
    assert answer.stderr == "error: --trials: must be an integer >= 1, got 0\n"


def trial_results(directory):
    return {path.parent.name: json.loads(path.read_text())
            for path in sorted(directory.glob("trial_*/results.json"))}


def test_killed_run_resumes_without_repeating_finished_trials(tmp_path):
    command = [sys.executable, str(REPOSITORY / "bayesopt.py"), "-c", ENERGY, BAYESOPT,
               "--trials", "8", "--initial", "6", "--parallel", "2", "--workers", "2",
               "-l", str(tmp_path), "-g", "bo", "--set", "hyperparameter_steps=20", "--no-progress"]
    directory = tmp_path / "bo" / "uci_energy" / "Random_Validation_BayesOpt"
    # First invocation: killed (with its workers) once 4 trials have finished.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while len(trial_results(directory)) < 4:
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "4 trials did not finish in time"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = {name: results for name, results in trial_results(directory).items()}
    first_times = {name: (directory / name / "results.json").stat().st_mtime_ns for name in first}
    assert not (directory / "best.json").exists()

    # Second invocation: resumes and runs only what is missing.
    answer = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert answer.returncode == 0, answer.stderr[-2000:]
    final = trial_results(directory)
    assert sorted(final) == [f"trial_{k}" for k in range(8)]
    for name, stamp in first_times.items():  # finished trials were not run again
        assert (directory / name / "results.json").stat().st_mtime_ns == stamp
    from ax import Client

    client = Client.load_from_json_file(str(directory / "ax_client.json"))
    statuses = [trial.status.name for trial in client._experiment.trials.values()]
    assert statuses == ["COMPLETED"] * 8

    best = json.loads((directory / "best.json").read_text())
    objectives = {name: results["objective"] for name, results in final.items()}
    assert best["trial"] == int(min(objectives, key=objectives.get).split("_")[1])
    assert best["objective"] == pytest.approx(min(objectives.values()))
    assert best["final"]["Loss/Test"] == final[f"trial_{best['trial']}"]["final"]["Loss/Test"]
    assert best["trials"] == 8 and best["completed_trials"] == 8
    assert -6 <= best["parameters"]["network_weight.lr"] <= -1
    # The best trial is in TensorBoard, read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory / "tensorboard"))
    events.Reload()
    assert events.Scalars("BayesOpt/Best/Loss/Test")[-1].value == pytest.approx(best["final"]["Loss/Test"])
    assert len(events.Scalars("BayesOpt/Objective")) >= 4
