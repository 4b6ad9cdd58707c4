"""parallel_exec.py, generators.py and the local executor: real training runs
on UCI energy, a re-run that does nothing, failures that stay contained, and
one-line errors for bad input."""
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

import executors
import generators
import parallel_exec
import report
from errors import UserError

REPOSITORY = Path(__file__).resolve().parents[1]
ENERGY = str(REPOSITORY / "configs" / "uci_energy.yaml")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # helpers below run in worker processes


# ------------------------------------------------------------------ generators

def test_natural_sgd_is_seeded_and_in_the_papers_ranges():
    first = generators.generate("natural_sgd", 200, seed=5)
    assert first == generators.generate("natural_sgd", 200, seed=5)
    assert first != generators.generate("natural_sgd", 200, seed=6)
    lrs = [o["network_weight.lr"] for o in first]
    decays = [o["network_weight.weight_decay"] for o in first]
    momenta = [1 / (1 + math.exp(-o["network_weight.momentum"])) for o in first]
    assert -6 <= min(lrs) < -5.5 and -1.5 < max(lrs) <= -1  # log10 lr ~ U(-6, -1)
    assert -7 <= min(decays) < -6.5 and -2.5 < max(decays) <= -2
    assert 0 <= min(momenta) < 0.05 and 0.95 < max(momenta) <= 1  # stored through the logit
    assert [o["seed"] for o in first[:3]] == [5, 6, 7]


def test_iteration_id_changes_only_the_seed():
    assert generators.generate("iteration_id", 3, seed=10) == [{"seed": 10}, {"seed": 11}, {"seed": 12}]


def test_from_directory_reads_override_files_including_the_papers_layout(tmp_path):
    (tmp_path / "init_0.yaml").write_text("config_dicts:\n  network_weight: {lr: -2.5, momentum: 0.1}\n")
    (tmp_path / "init_1.yaml").write_text("network_weight: {lr: -4.0}\nseed: 3\n")
    overrides = generators.generate("from_directory:" + str(tmp_path), None)
    assert overrides == [{"network_weight.lr": -2.5, "network_weight.momentum": 0.1},
                         {"network_weight.lr": -4.0, "seed": 3}]
    assert len(generators.generate({"class": "from_directory", "directory": str(tmp_path)}, 1)) == 1
    with pytest.raises(UserError, match="3 repetitions asked but .* holds only 2"):
        generators.generate("from_directory:" + str(tmp_path), 3)


def test_generator_options_from_yaml_spec():
    overrides = generators.generate({"class": "natural_sgd", "lr": [-3, -2]}, 50, seed=0)
    assert all(-3 <= o["network_weight.lr"] <= -2 for o in overrides)
    with pytest.raises(UserError, match="unknown option 'learning_rate'.*valid options: .*lr="):
        generators.generate({"class": "natural_sgd", "learning_rate": [-3, -2]}, 5)


@pytest.mark.parametrize("arguments, message", [
    (["--algorithms", "Randm", "--repetitions", "2"], "unknown algorithm 'Randm' (did you mean 'Random'?)"),
    (["--algorithms", "Random", "--repetitions", "0"], "--repetitions must be an integer >= 1, got 0"),
    (["--algorithms", "Random", "--repetitions", "2", "--generator", "natural"],
     "unknown generator class 'natural' (did you mean 'natural_sgd'?)"),
    (["--algorithms", "Random", "--repetitions", "2", "--generator", "from_directory:/no/such"],
     "directory '/no/such' not found"),
    (["--algorithms", "Random", "--repetitions", "2", "--set", "hyperparameter_step=3"],
     "unknown key 'hyperparameter_step'"),
    (["--algorithms", "Random", "--repetitions", "two"], "argument --repetitions: invalid int value: 'two'"),
    (["--algorithms", "Random", "--repetitions", "2", "--executor", "cluster"], "invalid choice: 'cluster'"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        parallel_exec.main(["-c", ENERGY, "-l", str(tmp_path), "--no-progress", *arguments])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    assert not any(tmp_path.iterdir())  # nothing started


def test_command_line_error_from_a_real_process(tmp_path):
    answer = subprocess.run([sys.executable, str(REPOSITORY / "parallel_exec.py"), "-c", ENERGY,
                             "--algorithms", "NoSuchAlgorithm", "--repetitions", "1", "-l", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert answer.returncode == 2
    assert answer.stderr.startswith("error: --algorithms: unknown algorithm 'NoSuchAlgorithm'")
    assert answer.stderr.count("\n") == 1


# ------------------------------------------------------------------ local executor

def crash_hard(job):
    if job["crash"]:
        os._exit(3)
    return {"status": "finished", "value": job["value"]}


def test_a_crashing_worker_process_fails_alone():
    executor = executors.make_executor("local", None, workers=2)
    jobs = [{"crash": index == 1, "value": index, "run_dir": f"run_{index}"} for index in range(4)]
    try:
        results = dict(executor.as_completed(executor.map(crash_hard, jobs)))
    finally:
        executor.shutdown()
    assert results[1]["status"] == "failed" and "exit code 3" in results[1]["error"]
    assert [results[k]["value"] for k in (0, 2, 3)] == [0, 2, 3]


# ------------------------------------------------------------------ real fan-out

def test_fanout_trains_skips_on_rerun_and_reports(tmp_path, uci_available):
    arguments = ["-c", ENERGY, "--algorithms", "Random", "Lorraine", "Ours_LR_Momentum",
                 "--repetitions", "4", "--workers", "2", "-l", str(tmp_path), "-g", "energy",
                 "--set", "hyperparameter_steps=10", "--no-progress"]
    assert parallel_exec.main(arguments) == 0
    group = tmp_path / "energy"
    summary = json.loads((group / "summary.json").read_text())
    assert summary["counts"] == {"finished": 12} and summary["launched"] == 12
    runs = {(line["algorithm"], line["repetition"]): Path(line["run_dir"]) for line in summary["runs"]}
    assert runs[("Random", 0)] == group / "uci_energy" / "Random" / "rep_0"
    initial = generators.generate("natural_sgd", 4, seed=0)
    for (algorithm, repetition), run_dir in runs.items():
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "finished" and results["hyperparameter_steps_done"] == 10
        assert results["seed"] == repetition
        if algorithm == "Random":  # fixed hyperparameters: the generated start, unchanged
            assert math.log10(results["hyperparameters"]["lr"]) == pytest.approx(
                initial[repetition]["network_weight.lr"], rel=1e-5)
    stamps = {key: (run_dir / "results.json").stat().st_mtime_ns for key, run_dir in runs.items()}

    # The same command again runs nothing; after losing one result, it reruns just that one.
    assert parallel_exec.main(arguments) == 0
    assert json.loads((group / "summary.json").read_text())["launched"] == 0
    (runs[("Lorraine", 2)] / "results.json").unlink()
    assert parallel_exec.main(arguments) == 0
    summary = json.loads((group / "summary.json").read_text())
    assert summary["launched"] == 1 and summary["skipped"] == 11
    assert all((run_dir / "results.json").stat().st_mtime_ns == stamps[key]
               for key, run_dir in runs.items() if key != ("Lorraine", 2))

    # The report over the fan-out.
    rows = {row["algorithm"]: row for row in report.report(group)}
    assert set(rows) == {"Random", "Lorraine", "Ours_LR_Momentum"}
    assert rows["Random"]["runs"] == 4 and rows["Random"]["time_ratio_to_random"] == 1.0
    finals = sorted(json.loads((runs[("Ours_LR_Momentum", k)] / "results.json").read_text())
                    ["final"]["Unnormalised_Loss/Test"] for k in range(4))
    assert rows["Ours_LR_Momentum"]["median"] == pytest.approx((finals[1] + finals[2]) / 2)
    assert rows["Ours_LR_Momentum"]["best"] == pytest.approx(finals[0])
    for name in ("report.md", "report.csv", "ecdf_UCI_Energy.png", "trajectories_UCI_Energy.png"):
        assert (group / name).stat().st_size > 0


def test_a_failing_algorithm_is_recorded_and_the_rest_go_on(tmp_path, uci_available):
    algorithms = tmp_path / "algorithms"
    algorithms.mkdir()
    (algorithms / "Random.yaml").write_text((REPOSITORY / "configs" / "Random.yaml").read_text())
    # Bad keys and values are refused before anything starts; missing data is
    # only found when a run loads it, so this algorithm fails in its workers.
    (algorithms / "Broken.yaml").write_text(f"algorithm: Broken\ndata_root: {tmp_path / 'nowhere'}\n"
                                            "dataset: {download: false}\n")
    status = parallel_exec.main(["-c", ENERGY, "--algorithms", "Broken", "Random", "--repetitions", "2",
                                 "--workers", "2", "--algorithm-dir", str(algorithms), "-l", str(tmp_path),
                                 "-g", "mixed", "--set", "hyperparameter_steps=5", "--no-progress"])
    assert status == 1
    summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    assert summary["counts"] == {"failed": 2, "finished": 2}
    for line in summary["runs"]:
        if line["algorithm"] == "Broken":
            assert "nowhere" in line["error"]
            assert "nowhere" in (Path(line["run_dir"]) / "error.txt").read_text()


def test_campaign_yaml_gives_defaults_and_the_command_line_wins(tmp_path):
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(f"config: [{ENERGY}]\nalgorithms: [Random, Ours_LR]\nrepetitions: 3\n"
                        "generator: {class: natural_sgd, lr: [-3, -2]}\nseed: 7\n"
                        "set: {hyperparameter_steps: 4}\n")
    arguments = parallel_exec.build_parser().parse_args(["--campaign", str(campaign), "--repetitions", "2",
                                                         "-l", str(tmp_path)])
    jobs = parallel_exec.plan(parallel_exec.resolve_options(arguments))
    assert [(job["algorithm"], job["repetition"]) for job in jobs] == [
        ("Random", 0), ("Random", 1), ("Ours_LR", 0), ("Ours_LR", 1)]
    assert all(-3 <= job["overrides"]["network_weight.lr"] <= -2 for job in jobs)
    assert all(job["overrides"]["hyperparameter_steps"] == 4 for job in jobs)
    assert jobs[0]["overrides"] == jobs[2]["overrides"]  # every algorithm starts from the same point
    assert jobs[0]["overrides"]["seed"] == 7
    campaign.write_text("algoritms: [Random]\n")
    with pytest.raises(UserError, match="unknown campaign key 'algoritms'.*did you mean 'algorithms'"):
        parallel_exec.resolve_options(parallel_exec.build_parser().parse_args(["--campaign", str(campaign)]))


# ------------------------------------------------------------------ nothing runs twice

DIGITS = str(REPOSITORY / "configs" / "digits.yaml")


def event_files(run_dir):
    return sorted(Path(run_dir).glob("events.out.tfevents.*"))


def training_steps(path):
    """The weight steps at which one event file logged ``Loss/Training``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            if value.tag == "Loss/Training":
                steps.append(event.step)
    return steps


def alive(pid):
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def test_a_killed_fanout_takes_its_workers_with_it_and_a_rerun_trains_each_run_once(tmp_path):
    arguments = [str(REPOSITORY / "parallel_exec.py"), "-c", DIGITS, "--algorithms", "Random",
                 "--generator", "iteration_id", "--repetitions", "2", "--workers", "2",
                 "-l", str(tmp_path), "-g", "killed", "--no-progress",
                 "--set", "hyperparameter_steps=600", "log_interval=10", "batch_size=32"]
    runs = [tmp_path / "killed" / "digits" / "Random" / f"rep_{k}" for k in range(2)]
    launcher = subprocess.Popen([sys.executable, *arguments], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not any(event_files(run) for run in runs):  # training has started
            assert time.time() < deadline and launcher.poll() is None, "no run started"
            time.sleep(0.1)
        time.sleep(1.0)
        workers = {int((run / ".lock").read_text() or 0) for run in runs if (run / ".lock").is_file()}
        assert workers and not any((run / "results.json").exists() for run in runs)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.time() + 3  # a run takes far longer: an orphan would still be training
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker outlived its killed launcher"
    assert not any((run / "results.json").exists() for run in runs)
    # The same command again, at once.
    again = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "finished" and results["hyperparameter_steps_done"] == 600
        [events] = event_files(run)  # exactly one event file: one training
        steps = training_steps(events)
        assert steps == sorted(set(steps)) and steps[-1] == 6000, steps[-5:]
        assert not list(run.glob(".*.tmp"))


def test_a_second_run_in_a_locked_directory_waits_and_does_not_train_again(tmp_path):
    import processes
    import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outcome = {}

    def second():
        outcome["results"] = train.main([DIGITS, str(REPOSITORY / "configs" / "Random.yaml")],
                                        {"hyperparameter_steps": 2}, run_dir=run_dir, progress=False)

    with processes.run_directory_lock(run_dir):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(2.0)
        assert thread.is_alive()  # waiting for the lock, not training
        assert not event_files(run_dir)
        # The first run finishes while the second waits.
        (run_dir / "results.json").write_text(json.dumps({"status": "finished", "first": True}))
    thread.join(60)
    assert outcome["results"] == {"status": "finished", "first": True}
    assert not event_files(run_dir)  # it did not train a second time
