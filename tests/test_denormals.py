"""``flush_denormal`` (default true): runs compute with subnormal floats
flushed to zero, and the process gets its own setting back afterwards.

Weights that weight decay drives towards zero pass through subnormals,
which the CPU computes ten to a hundred times slower (bench/RESULTS.md). The
effect is observed through a real run: a learning rate of 1e-39 is a float32
subnormal, so its natural value is 0 when the run flushes and 1e-39 when it
does not, in ``results.json`` and in the TensorBoard logs alike."""
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import engine
import population
import train
from test_population import ROOT

SOURCES = [ROOT / "configs" / "digits.yaml", ROOT / "configs" / "Random.yaml"]
SUBNORMAL_LR = {"network_weight.lr": -39.0, "hyperparameter_clipping.lr": [-50.0, 0.0],
                "hyperparameter_steps": 1, "network_weight_steps": 2, "log_interval": 2,
                "device": "cpu"}


def logged_lr(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("Hyperparameter/Lr")]


def test_the_context_flushes_inside_and_restores_the_setting_after():
    before = engine.flushing_denormals()
    with engine.denormals_flushed(True):
        assert engine.flushing_denormals()
        assert torch.tensor(1e-39).mul(1.0).item() == 0.0
        with engine.denormals_flushed(False):
            assert not engine.flushing_denormals()
            assert torch.tensor(1e-39).mul(1.0).item() > 0.0
        assert engine.flushing_denormals()
    assert engine.flushing_denormals() == before


# Two intra-op threads whose pool runs before the context is entered; a
# product over 2^20 float32 subnormals (bits 713000: about 1e-39) is split
# between them, and each thread's share is zero only where that thread flushes.
EVERY_THREAD = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import engine
torch.set_num_threads(2)
subnormals = torch.full((1 << 20,), 713000, dtype=torch.int32).view(torch.float32)
kept = lambda: int((subnormals * 0.5).count_nonzero())
print(kept(), engine._openmp_runtime() is not None)
with engine.denormals_flushed(True):
    print(kept())
print(kept())
"""


def test_every_intra_op_thread_flushes_inside_and_is_restored_after():
    """``torch.set_flush_denormal`` sets the calling thread's register
    only: before the fix a two-thread run kept the pool thread's half
    of every parallel operation subnormal (and slow). In a fresh process,
    so the thread count and the pool are this test's own."""
    output = subprocess.run([sys.executable, "-c", EVERY_THREAD, str(ROOT)], capture_output=True,
                            text=True, timeout=120, check=True).stdout.split()
    assert output == [str(1 << 20), "True", "0", str(1 << 20)]


@pytest.mark.parametrize("flush", [True, False], ids=["flush_denormal", "keep_subnormals"])
def test_a_run_computes_as_its_flush_denormal_says_and_restores_the_process(tmp_path, flush):
    before = engine.flushing_denormals()
    result = train.main(SOURCES, {**SUBNORMAL_LR, "flush_denormal": flush},
                        run_dir=tmp_path / "run", progress=False)
    expected = 0.0 if flush else pytest.approx(1e-39, rel=1e-5)
    assert result["hyperparameters"]["lr"] == expected
    assert logged_lr(tmp_path / "run") and all(value == expected for value in logged_lr(tmp_path / "run"))
    assert engine.flushing_denormals() == before


def test_flush_denormal_is_the_default_and_a_population_flushes_too(tmp_path):
    before = engine.flushing_denormals()
    members = [{"overrides": {**SUBNORMAL_LR, "seed": seed}, "run_dir": str(tmp_path / f"m{seed}"),
                "name": None} for seed in (0, 1)]
    results = population.main(SOURCES, members, progress=False)
    assert [result["hyperparameters"]["lr"] for result in results] == [0.0, 0.0]
    assert all(logged_lr(tmp_path / f"m{seed}") == [0.0] for seed in (0, 1))
    assert engine.flushing_denormals() == before


def test_flush_denormal_must_be_true_or_false(tmp_path):
    with pytest.raises(train.UserError, match="flush_denormal: must be true or false"):
        train.main(SOURCES, {**SUBNORMAL_LR, "flush_denormal": "yes"}, run_dir=tmp_path / "run",
                   progress=False)
