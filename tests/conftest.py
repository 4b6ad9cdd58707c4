"""Shared fixtures: fixed seeds, one CPU thread per test process, the data root."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Absolute, so that SLURM jobs and worker processes started elsewhere see the same root.
os.environ["HYPERGRAD_DATA"] = os.path.abspath(os.environ.get("HYPERGRAD_DATA", SHARED_DATA))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def digits_trainer():
    """A Trainer on the embedded digits data for an algorithm file (small batch)."""
    import config
    import train
    from engine import Trainer

    def make(algorithm, **overrides):
        cfg = train.prepare(config.load(
            [ROOT / "configs" / "digits.yaml", ROOT / "configs" / f"{algorithm}.yaml"],
            {"batch_size": 32, "device": "cpu", **overrides}))
        dtype = getattr(torch, cfg["dtype"])
        problem = train.load_problem(cfg, torch.device("cpu"), dtype)
        return Trainer(cfg, problem, torch.device("cpu"), dtype)

    return make


@pytest.fixture
def uci_available():
    if not (Path(os.environ["HYPERGRAD_DATA"]) / "uci" / "energy" / "data.txt").is_file():
        pytest.skip(f"UCI data not found under {os.environ['HYPERGRAD_DATA']}")
