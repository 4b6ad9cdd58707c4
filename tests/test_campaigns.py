"""campaigns/: one file per experiment of the paper's Section 4. Each parses,
plans (parallel_exec's ``plan``: every run's config stack loaded and checked,
nothing trained) and names existing configs and SLURM settings; the
Bayesian-optimisation search file parses with the paper's budget."""
from argparse import Namespace
from pathlib import Path

import pytest

import bayesopt
import executors
import parallel_exec

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGNS = ROOT / "campaigns"
SEARCH = CAMPAIGNS / "bayesopt_search.yaml"
UCI = ["boston", "concrete", "energy", "kin8nm", "naval", "power", "wine", "yacht"]
MAIN = ["Random", "Random_SteppedLR", "Baydin", "Lorraine", "Ours_LR", "Ours_LR_Momentum",
        "Ours_HDLR_Momentum", "DiffThroughOpt"]
LONG = ["LongDiffThroughOpt_Fashion-MNIST_Medium", "LongDiffThroughOpt_Fashion-MNIST_Standalone",
        "LongDiffThroughOpt_Fashion-MNIST_Full"]
# campaign -> (dataset config, repetitions, algorithms, executor)
PAPER = {**{f"uci_{name}": (f"uci_{name}", 200, MAIN, "local") for name in UCI},
         "fashion_mnist": ("fashion_mnist", 100, MAIN + LONG, "local"),
         "penn_treebank": ("penn_treebank", 200, MAIN, "slurm"),
         "cifar10": ("cifar10", 100, MAIN, "slurm")}


def campaign_files():
    return sorted(path.stem for path in CAMPAIGNS.glob("*.yaml") if path != SEARCH)


def test_one_campaign_per_experiment():
    assert campaign_files() == sorted(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_campaign_plans_the_papers_runs(name, tmp_path):
    path = CAMPAIGNS / f"{name}.yaml"
    arguments = parallel_exec.build_parser().parse_args(
        ["--campaign", str(path), "-l", str(tmp_path)])
    options = parallel_exec.resolve_options(arguments)
    dataset, repetitions, algorithms, executor = PAPER[name]
    assert [Path(c).resolve() for c in options["config"]] == [ROOT / "configs" / f"{dataset}.yaml"]
    assert options["algorithms"] == algorithms and options["repetitions"] == repetitions
    assert options["generator"] == "natural_sgd" and options["executor"] == executor
    executors.read_slurm_config(ROOT / options["slurm"])  # exists and holds only valid options
    jobs = parallel_exec.plan(options)  # loads and checks each algorithm's config stack
    assert len(jobs) == repetitions * len(algorithms)
    for job in jobs:
        assert all(Path(source).is_file() for source in job["config"])
    # every algorithm starts from the same initialisations
    first = {job["repetition"]: job["overrides"] for job in jobs if job["algorithm"] == algorithms[0]}
    assert all(job["overrides"] == first[job["repetition"]] for job in jobs)
    text = path.read_text()
    assert f"--campaign campaigns/{name}.yaml" in text and "opulation" in text


def test_bayesopt_search_file_has_the_papers_budget():
    search = bayesopt.read_search(str(SEARCH), Namespace(trials=None, initial=None, parallel=None,
                                                         seed=None, workers=None))
    assert search["trials"] == 30 and search["initial"] == 5
    assert set(search["parameters"]) == {"network_weight.lr", "network_weight.weight_decay",
                                         "network_weight.momentum"}
    for name in UCI:
        text = (CAMPAIGNS / f"uci_{name}.yaml").read_text()
        assert "bayesopt.py" in text and f"configs/uci_{name}.yaml" in text
        assert "campaigns/bayesopt_search.yaml" in text
