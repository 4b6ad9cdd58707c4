"""``compile: true``: ``torch.compile`` of the same pure step (:mod:`step`).

Compiled kernels may sum in another order, so a compiled run is compared
with the eager one to rounding (float64), and with itself bit for bit across
a checkpoint. Compilation is slow on a cold cache (20-60 s per step on a
2-core CPU), so this file keeps to a few small runs on digits.
"""
from pathlib import Path

import pytest
import torch

import train
from errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def seeded(make, *arguments, **overrides):
    torch.manual_seed(0)  # the same initial weights for both trainers
    return make(*arguments, **overrides)


def run_steps(trainer, steps):
    trainer.warm_up()
    for _ in range(steps):
        trainer.step()
    return trainer


@pytest.mark.parametrize("algorithm, overrides", [
    ("Random", {}), ("Ours_HDLR_Momentum", {}), ("Baydin", {}), ("DiffThroughOpt", {}),
    ("Ours_LR_Momentum", {"hypergradient.solver": "cg"}),
], ids=["Random", "Ours_HDLR_Momentum", "Baydin", "DiffThroughOpt", "Ours_LR_Momentum-cg"])
def test_compiled_step_matches_eager(algorithm, overrides, digits_trainer):
    """Fixed hyperparameters; the implicit step with an outer Adam on
    per-weight learning rates, with an outer SGD, with conjugate gradients
    (a fixed budget with masking: one graph); the unrolled step."""
    settings = {"dtype": "float64", **overrides}
    eager = run_steps(seeded(digits_trainer, algorithm, **settings), 3)
    compiled = run_steps(seeded(digits_trainer, algorithm, compile=True, **settings), 3)
    assert compiled.compiled and not eager.compiled
    assert compiled.weight_step == eager.weight_step == 3 * eager.network_weight_steps
    for ours, theirs in zip(compiled.weights, eager.weights):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for name, value in eager.state["hyperparameters"].items():
        torch.testing.assert_close(compiled.state["hyperparameters"][name], value,
                                   rtol=1e-9, atol=1e-12)
    if algorithm != "Random":
        initial = digits_trainer(algorithm, **settings).state["hyperparameters"]
        moved = [float((torch.cat([t.reshape(-1) for t in (a if isinstance(a, tuple) else (a,))])
                        - torch.cat([t.reshape(-1) for t in (b if isinstance(b, tuple) else (b,))])
                        ).abs().max())
                 for a, b in zip(compiled.state["hyperparameters"].values(), initial.values())]
        assert max(moved) > 1e-6, "the hyperparameters must have been updated"
        for name, value in eager.last_hypergradients.items():
            torch.testing.assert_close(compiled.last_hypergradients[name], value,
                                       rtol=1e-8, atol=1e-14)


def test_compiled_steps_hold_no_tensors_and_advance_the_counters_without_recompiling(
        digits_trainer):
    """The step counters are tensors in the state: the compiled pieces advance
    them and are not specialised on their values (a recompile is an error here)."""
    from test_hypergradients import count_tensors
    trainer = run_steps(seeded(digits_trainer, "Ours_LR_Momentum", dtype="float64",
                               compile=True), 3)
    before = count_tensors()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(10):
            trainer.step()
    after = count_tensors()
    assert after <= before + 2, (before, after)
    assert trainer.hyperparameter_step == 13
    assert trainer.weight_step == 13 * trainer.network_weight_steps


def test_compiled_run_resumes_bitwise_and_reports_compile_time(tmp_path, monkeypatch):
    sources = [CONFIGS / "digits.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    settings = {"hyperparameter_steps": 6, "checkpoint_every": 3, "device": "cpu",
                "log_interval": 10, "compile": True}
    whole = train.main(sources, settings, run_dir=tmp_path / "whole", progress=False)
    assert whole["compile_time_s"] > 0 and whole["status"] == "finished"

    from engine import Trainer
    original_step = Trainer.step

    def step_then_die(self):
        if self.hyperparameter_step == 4:
            raise KeyboardInterrupt("killed")
        original_step(self)

    monkeypatch.setattr(Trainer, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(sources, settings, run_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(Trainer, "step", original_step)
    resumed = train.main(sources, settings, run_dir=tmp_path / "killed", progress=False)
    assert resumed["final"] == whole["final"]
    assert resumed["hyperparameters"] == whole["hyperparameters"]


def test_compile_refuses_models_with_buffers(digits_trainer):
    with pytest.raises(UserError, match="compile: true is not supported for models with buffers"):
        digits_trainer("Ours_LR_Momentum", compile=True, **{"model.batch_norm": True})


def test_each_new_program_in_a_process_is_compiled_not_run_eagerly(digits_trainer):
    """A fan-out worker compiles program after program. Each is compiled
    afresh: past dynamo's recompile limit (2 here, 8 by default) the later
    ones would otherwise run eagerly without a word."""
    from torch._dynamo.utils import counters
    with torch._dynamo.config.patch(recompile_limit=2):
        for lr in (1e-3, 2e-3, 3e-3):
            before = counters["stats"]["unique_graphs"]
            trainer = run_steps(seeded(digits_trainer, "Random", compile=True,
                                       **{"network_weight.lr": lr}), 1)
            assert trainer.compiled and counters["stats"]["unique_graphs"] > before, lr
