"""report.py's paper table on a synthetic results directory with known
numbers: per dataset and algorithm, runs, diverged, median and mean ±
standard error of the final normalised test loss and (UCI) unnormalised MSE,
cost relative to Random, in report.md and paper_table.csv."""
import csv
import json
import math

import numpy as np
import pytest

import report


def write_run(directory, algorithm, final, wall_time, dataset, status="finished"):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({
        "status": status, "algorithm": algorithm, "dataset": dataset, "seed": 0,
        "run_dir": str(directory), "wall_time_s": wall_time, "final": final,
        "hyperparameters": {"lr": 1e-3}, "objective": 1.0}))


def uci(loss):
    return {"Loss/Test": loss / 100, "Unnormalised_Loss/Test": loss}


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "runs"
    energy = root / "uci_energy"
    for k, (loss, time) in enumerate([(4.0, 10.0), (2.0, 12.0), (8.0, 14.0)]):
        write_run(energy / "Random" / f"rep_{k}", "Random", uci(loss), time, "UCI_Energy")
    for k, (loss, time) in enumerate([(1.0, 30.0), (3.0, 40.0)]):
        write_run(energy / "Ours_LR" / f"rep_{k}", "Ours_LR", uci(loss), time, "UCI_Energy")
    write_run(energy / "Ours_LR" / "rep_2", "Ours_LR", uci(math.nan), 50.0, "UCI_Energy",
              status="diverged")
    campaign = energy / "bayesopt_0" / "uci_energy" / "Random_Validation_BayesOpt"
    write_run(campaign / "trial_0", "Random_Validation_BayesOpt", uci(9.0), 6.0, "UCI_Energy")
    (campaign / "best.json").write_text(json.dumps({
        "algorithm": "Random_Validation_BayesOpt", "dataset": "UCI_Energy", "trial": 0,
        "trials": 30, "final": uci(3.0), "total_training_time_s": 18.0}))
    for k, loss in enumerate([0.5, 0.25]):
        write_run(root / "digits" / "Random" / f"rep_{k}", "Random", {"Loss/Test": loss,
                                                                     "Accuracy/Test": 0.9},
                  2.0 + k, "Digits")
    return root


def test_paper_rows_have_the_known_numbers(results):
    report.report(results, plots=False)
    with open(results / "paper_table.csv") as handle:
        table = {(row["dataset"], row["algorithm"]): row for row in csv.DictReader(handle)}
    assert set(table) == {("UCI_Energy", "Random"), ("UCI_Energy", "Ours_LR"),
                          ("UCI_Energy", "Random_Validation_BayesOpt (BayesOpt)"),
                          ("Digits", "Random")}

    def number(row, column):
        return float(row[column]) if row[column] != "" else None

    random = table[("UCI_Energy", "Random")]
    assert (random["runs"], random["diverged"]) == ("3", "0")
    assert number(random, "Loss/Test median") == pytest.approx(0.04, rel=1e-12)
    assert number(random, "Loss/Test mean") == pytest.approx(0.14 / 3, rel=1e-12)
    assert number(random, "Loss/Test standard_error") == pytest.approx(
        np.std([0.04, 0.02, 0.08], ddof=1) / math.sqrt(3), rel=1e-12)
    assert number(random, "Unnormalised_Loss/Test median") == 4.0
    assert number(random, "Unnormalised_Loss/Test mean") == pytest.approx(14 / 3, rel=1e-12)
    assert number(random, "Unnormalised_Loss/Test standard_error") == pytest.approx(
        np.std([4, 2, 8], ddof=1) / math.sqrt(3), rel=1e-12)
    assert number(random, "cost_relative_to_random") == 1.0

    ours = table[("UCI_Energy", "Ours_LR")]
    assert (ours["runs"], ours["diverged"]) == ("3", "1")
    assert number(ours, "Unnormalised_Loss/Test median") == 3.0  # the diverged run is +inf
    assert number(ours, "Unnormalised_Loss/Test mean") == 2.0    # the others' mean
    assert number(ours, "Unnormalised_Loss/Test standard_error") == pytest.approx(1.0, rel=1e-12)
    assert number(ours, "Loss/Test median") == pytest.approx(0.03, rel=1e-12)
    assert number(ours, "cost_relative_to_random") == pytest.approx(40 / 12, rel=1e-12)

    bayesopt = table[("UCI_Energy", "Random_Validation_BayesOpt (BayesOpt)")]
    assert (bayesopt["runs"], bayesopt["diverged"]) == ("1", "0")  # one search, its best trial
    assert number(bayesopt, "Unnormalised_Loss/Test median") == 3.0
    assert number(bayesopt, "cost_relative_to_random") == pytest.approx(18 / 12, rel=1e-12)

    digits = table[("Digits", "Random")]
    assert number(digits, "Loss/Test median") == pytest.approx(0.375, rel=1e-12)
    assert number(digits, "Unnormalised_Loss/Test median") is None  # classification: no MSE
    assert number(digits, "cost_relative_to_random") == 1.0


def test_paper_table_in_the_markdown_report(results):
    report.report(results, plots=False)
    text = (results / "report.md").read_text()
    assert text.index("## The paper's table") < text.index("## Details")
    paper = text[text.index("## The paper's table"):text.index("## Details")]
    assert "### UCI_Energy" in paper and "### Digits" in paper
    assert ("| algorithm | runs | diverged | median test loss | mean ± s.e. test loss | "
            "median unnormalised test MSE | mean ± s.e. unnormalised test MSE | cost × Random |"
            ) in paper
    assert "| Ours_LR | 3 | 1 | 0.03 | 0.02 ± 0.01 | 3 | 2 ± 1 | 3.33 |" in paper
    assert "| Random | 3 | 0 | 0.04 | 0.04667 ± 0.018 | 4 | 4.667 ± 1.8 | 1 |" in paper
    assert "| Random_Validation_BayesOpt (BayesOpt) | 1 | 0 | 0.03 | 0.03 ± – | 3 | 3 ± – | 1.5 |" \
        in paper
    digits = paper[paper.index("### Digits"):]
    assert "unnormalised" not in digits.split("\n\n")[1].split("\n")[0]
    assert "| Random | 2 | 0 | 0.375 | 0.375 ± 0.12 | 1 |" in digits


def test_cdf_figure_per_dataset(results):
    report.report(results)
    for name in ("ecdf_UCI_Energy.png", "ecdf_Digits.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_population_members_cost_is_its_share_of_the_populations_loop(tmp_path):
    """Every member records its whole population's loop time; the cost
    column divides it by the population's size."""
    root = tmp_path / "runs"
    for k in range(2):
        write_run(root / "Random" / f"rep_{k}", "Random", uci(1.0), 10.0, "UCI_Energy")
    for k in range(4):
        directory = root / "Ours_LR" / f"rep_{k}"
        write_run(directory, "Ours_LR", uci(1.0), 60.0, "UCI_Energy")
        record = json.loads((directory / "results.json").read_text())
        (directory / "results.json").write_text(json.dumps({**record, "population_size": 4}))
    report.report(root, plots=False)
    with open(root / "paper_table.csv") as handle:
        table = {row["algorithm"]: row for row in csv.DictReader(handle)}
    assert float(table["Ours_LR"]["cost_relative_to_random"]) == pytest.approx(1.5)
