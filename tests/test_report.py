"""report.py on runs with known numbers: tables, CSV, Markdown, plots, and
TensorBoard logs read back with TensorBoard's own reader."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

import report

REPOSITORY = Path(__file__).resolve().parents[1]


def fake_run(directory, algorithm, test_loss, wall_time, status="finished", dataset="UCI_Energy", lr=1e-3):
    """A run directory as train.main leaves it: results.json and TensorBoard scalars."""
    directory.mkdir(parents=True)
    final = {"Loss/Test": test_loss / 100, "Unnormalised_Loss/Test": test_loss}
    (directory / "results.json").write_text(json.dumps({
        "status": status, "algorithm": algorithm, "dataset": dataset, "seed": 0, "run_dir": str(directory),
        "wall_time_s": wall_time, "final": final, "hyperparameters": {"lr": lr},
        "objective": 1e10 if status == "diverged" else test_loss}))
    writer = SummaryWriter(str(directory))
    for step in (10, 20, 30):
        writer.add_scalar("Unnormalised_Loss/Test", test_loss * 30 / step, step)
        writer.add_scalar("Hyperparameter/Lr", lr * step, step)
        writer.add_scalar("Hyperparameter/Weight_Decay", 1e-4, step)
        writer.add_scalar("Hyperparameter/Momentum", 0.5, step)
    writer.close()


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for k, (loss, time) in enumerate([(4.0, 10.0), (2.0, 12.0), (8.0, 14.0)]):
        fake_run(root / "uci_energy" / "Random" / f"rep_{k}", "Random", loss, time)
    for k, (loss, time) in enumerate([(1.0, 30.0), (3.0, 40.0)]):
        fake_run(root / "uci_energy" / "Ours_LR" / f"rep_{k}", "Ours_LR", loss, time)
    fake_run(root / "uci_energy" / "Ours_LR" / "rep_2", "Ours_LR", math.nan, 50.0, status="diverged")
    failed = root / "uci_energy" / "Ours_LR" / "rep_3"
    failed.mkdir()
    (failed / "error.txt").write_text("Traceback ...")
    campaign = root / "uci_energy" / "Random_Validation_BayesOpt"
    for k in range(3):
        fake_run(campaign / f"trial_{k}", "Random_Validation_BayesOpt", 5.0 - k, 6.0)
    (campaign / "best.json").write_text(json.dumps({
        "algorithm": "Random_Validation_BayesOpt", "dataset": "UCI_Energy", "trial": 2, "trials": 3,
        "final": {"Unnormalised_Loss/Test": 3.0, "Loss/Test": 0.03}, "total_training_time_s": 18.0}))
    fake_run(root / "digits" / "Random" / "rep_0", "Random", 0.5, 1.0, dataset="Digits")
    return root


def test_table_numbers(runs):
    rows = {(row["dataset"], row["algorithm"]): row for row in report.report(runs, plots=False)}
    random = rows[("UCI_Energy", "Random")]
    assert random["runs"] == 3 and random["diverged"] == 0
    assert random["median"] == 4.0 and random["best"] == 2.0
    assert random["mean"] == pytest.approx(14 / 3)
    assert random["standard_error"] == pytest.approx(np.std([4, 2, 8], ddof=1) / math.sqrt(3))
    assert random["median_time_s"] == 12.0 and random["time_ratio_to_random"] == 1.0
    ours = rows[("UCI_Energy", "Ours_LR")]
    assert ours["runs"] == 3 and ours["diverged"] == 1 and ours["failed"] == 1
    assert ours["median"] == 3.0  # the diverged run counts as +inf
    assert ours["mean"] == 2.0 and ours["best"] == 1.0  # the mean is over the finite ones
    assert ours["time_ratio_to_random"] == pytest.approx(40 / 12)
    bayesopt = rows[("UCI_Energy", "Random_Validation_BayesOpt (BayesOpt)")]
    assert bayesopt["runs"] == 1 and bayesopt["trials"] == 3 and bayesopt["total_time_s"] == 18.0
    assert bayesopt["median"] == 3.0  # the best trial's test loss; trials are not runs of their own
    assert ("UCI_Energy", "Random_Validation_BayesOpt") not in rows
    assert rows[("Digits", "Random")]["runs"] == 1


def test_files_written(runs):
    report.report(runs, metric="Loss/Test")
    with open(runs / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    random = next(row for row in table if row["dataset"] == "UCI_Energy" and row["algorithm"] == "Random")
    assert float(random["median"]) == pytest.approx(0.04)
    text = (runs / "report.md").read_text()
    assert "## UCI_Energy" in text and "## Digits" in text and "final `Loss/Test`" in text
    assert "| Ours_LR | 3 | 1 | 1 | 0.03 |" in text
    for name in ("ecdf_UCI_Energy.png", "trajectories_UCI_Energy.png", "ecdf_Digits.png"):
        assert (runs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_tensorboard_scalars_and_median_curves(runs):
    series = report.read_scalars(runs / "uci_energy" / "Random" / "rep_1",
                                 ["Unnormalised_Loss/Test", "Hyperparameter/Lr", "Missing/Tag"])
    steps, values = series["Unnormalised_Loss/Test"]
    assert steps.tolist() == [10, 20, 30]
    assert values.tolist() == pytest.approx([6.0, 3.0, 2.0])
    assert series["Hyperparameter/Lr"][1].tolist() == pytest.approx([0.01, 0.02, 0.03])
    assert "Missing/Tag" not in series
    grid, median = report.median_curve([(np.array([1.0, 2.0]), np.array([1.0, 3.0])),
                                        (np.array([1.0, 2.0, 3.0]), np.array([2.0, 5.0, 7.0])),
                                        (np.array([1.0, 3.0]), np.array([10.0, 20.0]))])
    assert grid.tolist() == [1, 2, 3]
    assert median.tolist() == [2.0, 5.0, 7.0]  # the first run holds 3.0 after its last step


def test_unknown_metric_lists_the_available_ones(runs):
    with pytest.raises(report.UserError, match="--metric Accuracy/Test: no run reports it; "
                                               "available: Loss/Test, Unnormalised_Loss/Test"):
        report.report(runs, metric="Accuracy/Test")


def test_bad_directory_is_one_line_exit_2(tmp_path):
    for target in (tmp_path / "missing", tmp_path):
        answer = subprocess.run([sys.executable, str(REPOSITORY / "report.py"), str(target)],
                                capture_output=True, text=True, timeout=120)
        assert answer.returncode == 2
        assert answer.stderr.startswith("error: ") and answer.stderr.count("\n") == 1
