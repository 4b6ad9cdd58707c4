"""``compile: true``: the same training, kernel-fused with ``torch.compile``.

Compiled kernels may sum in another order, so a compiled run is compared
with the eager one to rounding (float64), and with itself bit for bit across
a checkpoint. Compilation is slow on a cold cache (seconds per function), so
this file keeps to a few small runs on digits.
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


@pytest.mark.parametrize("algorithm", ["Random", "Ours_LR_Momentum", "Ours_HDLR_Momentum",
                                       "Baydin"])
def test_compiled_training_matches_eager(algorithm, digits_trainer):
    """Fixed hyperparameters; the fused hyperparameter step with an outer
    Adam on scalar and on per-weight learning rates, and with an outer SGD."""
    eager = run_steps(seeded(digits_trainer, algorithm, dtype="float64"), 3)
    fused = run_steps(seeded(digits_trainer, algorithm, dtype="float64", compile=True), 3)
    assert fused.compiled is not None and eager.compiled is None
    # every closed-form implicit method with the Neumann solver runs as one graph
    assert (fused.compiled.hyperparameter_step is None) == (algorithm == "Random")
    assert fused.weight_step == eager.weight_step == 3 * eager.network_weight_steps
    for ours, theirs in zip(fused.weights, eager.weights):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(fused.hyperparameters.leaves(), eager.hyperparameters.leaves()):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    if algorithm != "Random":
        initial = digits_trainer(algorithm, dtype="float64").hyperparameters.leaves()
        moved = [float((a - b).abs().max()) for a, b in zip(fused.hyperparameters.leaves(), initial)]
        assert max(moved) > 1e-6, "the hyperparameters must have been updated"
        for name, value in eager.last_hypergradients.items():
            torch.testing.assert_close(fused.last_hypergradients[name], value,
                                       rtol=1e-8, atol=1e-14)


def test_fused_steps_hold_no_tensors_across_hyperparameter_steps(digits_trainer):
    from test_hypergradients import count_tensors
    trainer = run_steps(seeded(digits_trainer, "Ours_LR_Momentum", dtype="float64",
                               compile=True), 3)
    before = count_tensors()
    for _ in range(10):
        trainer.step()
    after = count_tensors()
    assert after <= before + 2, (before, after)


def test_compiled_conjugate_gradients_uses_separate_products(digits_trainer):
    """CG stops on a data-dependent test, which one graph cannot hold: it runs
    on the separately compiled gradient and Hessian-vector product instead,
    and still matches eager."""
    settings = {"dtype": "float64", "hypergradient.solver": "cg"}
    eager = run_steps(seeded(digits_trainer, "Ours_LR_Momentum", **settings), 2)
    compiled = run_steps(seeded(digits_trainer, "Ours_LR_Momentum", compile=True, **settings), 2)
    assert compiled.compiled.hyperparameter_step is None
    for ours, theirs in zip(compiled.hyperparameters.leaves(), eager.hyperparameters.leaves()):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(compiled.weights, eager.weights):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


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


def test_compile_refuses_what_it_does_not_compile(digits_trainer):
    with pytest.raises(UserError, match="compile: true supports.*Unrolled"):
        digits_trainer("DiffThroughOpt", compile=True)
    with pytest.raises(UserError, match="compile: true is not supported for models with buffers"):
        digits_trainer("Ours_LR_Momentum", compile=True, **{"model.batch_norm": True})


def test_compile_failure_is_one_line(tmp_path):
    """A model dynamo cannot trace into one graph (``nn.LSTM``) is refused
    with one line before training, not a traceback or a silent eager run."""
    folder = tmp_path / "penn_treebank"
    folder.mkdir()
    for split, text in (("train", "the cat sat on the mat\n" * 20), ("valid", "the cat sat\n" * 5),
                        ("test", "the mat sat\n" * 5)):
        (folder / f"ptb.{split}.txt").write_text(text)
    with pytest.raises(UserError) as error:
        train.main([CONFIGS / "penn_treebank.yaml", CONFIGS / "Ours_LR_Momentum.yaml"],
                   {"data_root": str(tmp_path), "dataset.sequence_length": 4, "batch_size": 4,
                    "model.embedding_size": 8, "model.hidden_size": 8, "model.fused": True,
                    "hyperparameter_steps": 1, "device": "cpu", "compile": True},
                   log_root=tmp_path / "runs", progress=False)
    message = str(error.value)
    assert message.startswith("compile: torch.compile failed") and "\n" not in message
    assert message.endswith("use compile: false")
