"""parallel_exec.py --population-size: each algorithm's runs packed into
vectorised populations (``population.main``), with the run
directories, skip-finished, resume, failure records and results of the
per-run fan-out. Real training on the embedded digits data, a few steps.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import generators
import parallel_exec
import report

REPOSITORY = Path(__file__).resolve().parents[1]
DIGITS = str(REPOSITORY / "configs" / "digits.yaml")
TEACHING = str(REPOSITORY / "configs" / "digits_teaching.yaml")
SHORT = ["hyperparameter_steps=3", "log_interval=10", "device=cpu"]


def fanout(log_root, group, *extra, algorithms=("Random", "Ours_LR_Momentum"), repetitions=5,
           steps=SHORT):
    """Run ``parallel_exec.main``; returns (exit status, summary.json)."""
    status = parallel_exec.main(["-c", DIGITS, "--algorithms", *algorithms, "--repetitions", str(repetitions),
                                 "--workers", "2", "-l", str(log_root), "-g", group, "--no-progress",
                                 "--set", *steps, *extra])
    return status, json.loads((Path(log_root) / group / "summary.json").read_text())


def results_of(summary):
    return {(line["algorithm"], line["repetition"]): json.loads((Path(line["run_dir"]) / "results.json").read_text())
            for line in summary["runs"]}


# ------------------------------------------------------------------ no engine needed

@pytest.mark.parametrize("runs, size, sizes", [
    (5, 2, [2, 2, 1]), (200, 64, [50, 50, 50, 50]), (65, 64, [33, 32]), (64, 64, [64]), (3, 8, [3]),
    (1, 1, [1])], ids=["5-by-2", "200-by-64", "65-by-64", "64-by-64", "3-by-8", "1-by-1"])
def test_runs_split_into_populations_of_at_most_m_as_even_as_possible(runs, size, sizes):
    groups = parallel_exec.split_evenly(list(range(runs)), size)
    assert [len(group) for group in groups] == sizes
    assert [index for group in groups for index in group] == list(range(runs))  # order kept, none twice


@pytest.mark.parametrize("value", ["0", "-3", "two"], ids=["zero", "negative", "not-a-number"])
def test_bad_population_size_is_one_line_and_exit_2(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        parallel_exec.main(["-c", DIGITS, "--algorithms", "Random", "--repetitions", "2",
                            "--population-size", value, "-l", str(tmp_path), "--no-progress"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "--population-size" in error
    assert not any(tmp_path.iterdir())


def test_campaign_key_population_size(tmp_path):
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(f"config: [{DIGITS}]\nalgorithms: [Random]\nrepetitions: 2\npopulation_size: 8\n")
    options = parallel_exec.resolve_options(parallel_exec.build_parser().parse_args(["--campaign", str(campaign)]))
    assert options["population_size"] == 8
    campaign.write_text(f"config: [{DIGITS}]\nalgorithms: [Random]\npopulation_size: many\n")
    with pytest.raises(parallel_exec.UserError, match=r"campaign.yaml: population_size: must be an integer >= 1, got 'many'"):
        parallel_exec.resolve_options(parallel_exec.build_parser().parse_args(["--campaign", str(campaign)]))


def test_a_refused_configuration_runs_one_process_per_run_and_says_so(tmp_path, capsys):
    tiny = ["teaching.steps=20", "teaching.warmup_steps=5", "teaching.update_every=5",
            "teaching.log_interval=10", "device=cpu"]
    status = parallel_exec.main(["-c", TEACHING, "--algorithms", "AuxiLearn_Linear", "--repetitions", "2",
                                 "--generator", "iteration_id", "--workers", "2", "--population-size", "2",
                                 "-l", str(tmp_path), "-g", "teach", "--no-progress", "--set", *tiny])
    assert status == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "not vectorised" in line]
    assert len(lines) == 1 and lines[0].startswith("AuxiLearn_Linear: 2 run(s) one process each")
    summary = json.loads((tmp_path / "teach" / "summary.json").read_text())
    assert summary["counts"] == {"finished": 2} and summary["populations"] == []
    reason = summary["not_vectorised"]["AuxiLearn_Linear"]["reason"]
    assert "teaching.class" in reason  # names the key
    assert [line["run_dir"] for line in summary["runs"]] == [
        str((tmp_path / "teach" / "digits_teaching" / "AuxiLearn_Linear" / f"rep_{k}").resolve())
        for k in range(2)]


# ------------------------------------------------------------------ real populations

def test_populations_give_the_per_run_fanouts_runs_member_by_member(tmp_path):
    float64 = [*SHORT, "dtype=float64"]
    status, alone = fanout(tmp_path, "alone", steps=float64, repetitions=3)
    assert status == 0
    status, packed = fanout(tmp_path, "packed", "--population-size", "2", steps=float64, repetitions=3)
    assert status == 0 and packed["counts"] == {"finished": 6} and packed["launched"] == 6
    # Packing: per algorithm, at most 2 members, every repetition once.
    assert [(p["algorithm"], p["repetitions"]) for p in packed["populations"]] == [
        ("Random", [0, 1]), ("Random", [2]), ("Ours_LR_Momentum", [0, 1]), ("Ours_LR_Momentum", [2])]
    assert packed["not_vectorised"] == {}
    # The per-run layout, and the per-run fan-out's generator draws.
    draws = generators.generate("natural_sgd", 3, seed=0)
    for line in packed["runs"]:
        expected = tmp_path / "packed" / "digits" / line["algorithm"] / f"rep_{line['repetition']}"
        assert line["run_dir"] == str(expected.resolve())
        for name in ("config.yaml", "results.json"):
            assert (expected / name).is_file()
        assert any(expected.rglob("events.out.tfevents.*"))
    alone_results, packed_results = results_of(alone), results_of(packed)
    for key, single in alone_results.items():
        member = packed_results[key]
        assert member["status"] == single["status"] == "finished"
        assert member["seed"] == single["seed"] == key[1]
        assert member["hyperparameter_steps_done"] == single["hyperparameter_steps_done"] == 3
        for metric, value in single["final"].items():
            assert member["final"][metric] == pytest.approx(value, rel=1e-8, abs=1e-12), (key, metric)
        for name, value in single["hyperparameters"].items():
            assert member["hyperparameters"][name] == pytest.approx(value, rel=1e-8), (key, name)
        if key[0] == "Random":  # fixed hyperparameters: exactly the generated start
            assert math.log10(member["hyperparameters"]["lr"]) == pytest.approx(
                draws[key[1]]["network_weight.lr"], rel=1e-9)
    # report.py reads a populated fan-out as it reads a per-run one.
    rows = {row["algorithm"]: row for row in report.report(tmp_path / "packed")}
    reference = {row["algorithm"]: row for row in report.report(tmp_path / "alone")}
    assert set(rows) == {"Random", "Ours_LR_Momentum"}
    for algorithm, row in rows.items():
        assert row["runs"] == 3 and row["median"] == pytest.approx(reference[algorithm]["median"], rel=1e-8)


def test_rerun_skips_finished_members_and_repacks_the_rest(tmp_path):
    arguments = ("--population-size", "4")
    status, first = fanout(tmp_path, "again", *arguments, algorithms=("Ours_LR_Momentum",), repetitions=4)
    assert status == 0 and first["counts"] == {"finished": 4}
    runs = {line["repetition"]: Path(line["run_dir"]) for line in first["runs"]}
    stamps = {k: (run_dir / "results.json").stat().st_mtime_ns for k, run_dir in runs.items()}
    status, second = fanout(tmp_path, "again", *arguments, algorithms=("Ours_LR_Momentum",), repetitions=4)
    assert second["launched"] == 0 and second["skipped"] == 4 and second["populations"] == []
    for lost in (1, 3):
        (runs[lost] / "results.json").unlink()
    status, third = fanout(tmp_path, "again", *arguments, algorithms=("Ours_LR_Momentum",), repetitions=4)
    assert status == 0 and third["launched"] == 2 and third["skipped"] == 2
    assert [p["repetitions"] for p in third["populations"]] == [[1, 3]]
    assert all((runs[k] / "results.json").stat().st_mtime_ns == stamps[k] for k in (0, 2))
    assert third["counts"] == {"finished": 4}


def test_a_killed_populated_fanout_resumes_its_members_from_their_checkpoints(tmp_path):
    steps = ["hyperparameter_steps=40", "checkpoint_every=2", "batch_size=32", "log_interval=50",
             "device=cpu", "dtype=float64"]
    command = [sys.executable, str(REPOSITORY / "parallel_exec.py"), "-c", DIGITS, "--algorithms",
               "Ours_LR_Momentum", "--repetitions", "3", "--workers", "1", "--population-size", "3",
               "-l", str(tmp_path), "-g", "killed", "--no-progress", "--set", *steps]
    runs = [tmp_path / "killed" / "digits" / "Ours_LR_Momentum" / f"rep_{k}" for k in range(3)]
    submitter = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)  # its worker process too, for the kill below
    try:
        deadline = time.time() + 180
        while not all((run / "checkpoint.pt").is_file() for run in runs):
            assert submitter.poll() is None, "the fan-out ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.1)
    finally:
        os.killpg(submitter.pid, signal.SIGKILL)
        submitter.wait()
    assert not any((run / "results.json").exists() for run in runs)
    status, resumed = fanout(tmp_path, "killed", "--workers", "1", "--population-size", "3",
                             algorithms=("Ours_LR_Momentum",), repetitions=3, steps=steps)
    assert status == 0 and resumed["launched"] == 3 and resumed["counts"] == {"finished": 3}
    status, reference = fanout(tmp_path, "uninterrupted", "--population-size", "3",
                               algorithms=("Ours_LR_Momentum",), repetitions=3, steps=steps)
    assert status == 0
    for key, expected in results_of(reference).items():
        got = results_of(resumed)[key]
        assert got["hyperparameter_steps_done"] == 40
        for metric, value in expected["final"].items():
            assert got["final"][metric] == pytest.approx(value, rel=1e-10, abs=1e-14), (key, metric)


def test_one_failing_population_is_recorded_for_each_member_and_the_others_go_on(tmp_path):
    broken = tmp_path / "broken" / "digits" / "Random" / "rep_0"
    broken.mkdir(parents=True)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")  # its population cannot resume
    status, summary = fanout(tmp_path, "broken", "--population-size", "2", algorithms=("Random",),
                             repetitions=4)
    assert status == 1
    assert summary["counts"] == {"failed": 2, "finished": 2}
    by_repetition = {line["repetition"]: line for line in summary["runs"]}
    for repetition in (0, 1):  # the population that held the broken member
        line = by_repetition[repetition]
        assert line["status"] == "failed" and line["error"]
        assert (Path(line["run_dir"]) / "error.txt").read_text().strip()
        assert not (Path(line["run_dir"]) / "results.json").exists()
    for repetition in (2, 3):
        assert by_repetition[repetition]["status"] == "finished"
        assert not (Path(by_repetition[repetition]["run_dir"]) / "error.txt").exists()
