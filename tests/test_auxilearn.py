"""AuxiLearn: implicit hypergradients (``MetaOptimizer``, on the core's
``hypergradients.implicit``) against the exact Hessian solve and finite
differences at the inner optimum, the MetaOptimizer wrapper, and learning on
the embedded digits against its baselines."""
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import functional_call

from commentaries import auxilearn, storage
from errors import UserError


class RegressionProblem:
    """Linear regression with a main target and K auxiliary targets on the same inputs:
    per-example squared errors ``ℓ_k = (x·w - y_k)²`` combined by a combiner, plus
    L2 ``ρ/2 |w|²``. With the linear combiner the training loss is a convex
    quadratic in ``w``, so its minimiser and exact hypergradients are computable."""

    def __init__(self, combiner, samples=12, features=3, tasks=2, ridge=0.1):
        torch.manual_seed(0)
        self.x = torch.randn(samples, features, dtype=torch.float64)
        self.targets = torch.randn(samples, tasks + 1, dtype=torch.float64)
        self.x_val = torch.randn(samples, features, dtype=torch.float64)
        self.y_val = self.x_val @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
        self.combiner = combiner.double()
        self.ridge = ridge

    def aux_params(self):
        return dict(self.combiner.named_parameters())

    def train_loss(self, w, aux_params=None):
        """``L_T(w, θ)``; θ: the combiner's own parameters unless given (a function for torch.func)."""
        errors = (self.x @ w).unsqueeze(1) - self.targets
        squared = errors ** 2
        combined = functional_call(self.combiner, aux_params or self.aux_params(), (squared[:, 0], squared[:, 1:]))
        return combined + 0.5 * self.ridge * (w * w).sum()

    def val_loss(self, w, aux_params=None):
        return ((self.x_val @ w - self.y_val) ** 2).mean()

    def minimiser(self, iterations=3):
        """Newton's method (exact in one step for the quadratic case)."""
        w = torch.zeros(self.x.shape[1], dtype=torch.float64)
        for _ in range(iterations):
            gradient = torch.autograd.functional.jacobian(self.train_loss, w)
            hessian = torch.autograd.functional.hessian(self.train_loss, w)
            w = w - torch.linalg.solve(hessian, gradient)
        return w

    def stable_lr(self, w):
        """A Neumann step size below 2/λ_max(H), where the series converges."""
        hessian = torch.autograd.functional.hessian(self.train_loss, w)
        return 0.9 / torch.linalg.eigvalsh(hessian).max().item()

    def exact_hypergradient(self, w):
        """``-∇_w L_V · H⁻¹ · ∂²L_T/∂w∂θ`` with the Hessian solved exactly."""
        params = list(self.combiner.parameters())
        hessian = torch.autograd.functional.hessian(self.train_loss, w)
        solution = torch.linalg.solve(hessian, torch.autograd.functional.jacobian(self.val_loss, w))
        w = w.detach().requires_grad_()
        (train_gradient,) = torch.autograd.grad(self.train_loss(w), w, create_graph=True)
        mixed = torch.autograd.grad(train_gradient, params, grad_outputs=solution)
        return tuple(-g for g in mixed)

    def implicit(self, w, steps, lr, solver="neumann"):
        meta = auxilearn.MetaOptimizer(None, hypergradient_lr=lr, neumann_steps=steps, solver=solver)
        gradient = meta.hypergradient(val_loss=self.val_loss, train_loss=self.train_loss,
                                      aux_params=self.aux_params(), parameters=w)
        return tuple(gradient.values())


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("combiner", [auxilearn.LinearCombiner(2),
                                      auxilearn.NonlinearCombiner(2, hidden_size=3)],
                         ids=["linear", "nonlinear"])
def test_neumann_hypergradient_converges_to_the_exact_solve(combiner):
    torch.manual_seed(1)
    problem = RegressionProblem(combiner)
    w = torch.randn(3, dtype=torch.float64)
    exact = flat(problem.exact_hypergradient(w))
    lr = problem.stable_lr(w)
    errors = [(flat(problem.implicit(w, steps, lr)) - exact).norm() / exact.norm()
              for steps in (1, 5, 20, 400)]
    assert errors[0] > 1e-2  # one term (greedy) is not the exact answer...
    assert errors[1] < errors[0] and errors[2] < errors[1]  # ...more terms approach it
    assert errors[3] < 1e-8
    assert exact.abs().max() > 1e-3
    cg = flat(problem.implicit(w, 3, lr, solver="cg"))  # 3 unknowns: CG is exact in 3 iterations
    assert (cg - exact).norm() / exact.norm() < 1e-8


def test_implicit_hypergradient_matches_finite_differences_at_the_optimum():
    problem = RegressionProblem(auxilearn.LinearCombiner(2))
    w_star = problem.minimiser()
    implicit = flat(problem.implicit(w_star, steps=500, lr=problem.stable_lr(w_star)))
    raw = problem.combiner.raw
    for index in range(raw.numel()):
        values = []
        for shift in (1e-5, -1e-5):
            with torch.no_grad():
                raw[index] += shift
            values.append(problem.val_loss(problem.minimiser()).item())
            with torch.no_grad():
                raw[index] -= shift
        finite_difference = (values[0] - values[1]) / 2e-5
        assert implicit[index].item() == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)
    assert implicit.abs().min() > 1e-3


def test_meta_optimizer_steps_against_the_hypergradient_and_clips():
    """``step`` takes loss *functions* of (weights, auxiliary parameters), as a
    torch.func implicit hypergradient needs, and the parameters as AuxiLearn's
    wrapper does (here lists: the functions then get lists)."""
    problem = RegressionProblem(auxilearn.LinearCombiner(2))
    w = problem.minimiser()
    before = problem.combiner.raw.detach().clone()
    lr = problem.stable_lr(w)
    (exact,) = problem.exact_hypergradient(w)
    meta = auxilearn.MetaOptimizer(torch.optim.SGD(problem.combiner.parameters(), lr=0.5),
                                   hypergradient_lr=lr, neumann_steps=500, max_grad_norm=1e-3)
    (grad,) = meta.step(val_loss=lambda weights, aux: problem.val_loss(weights[0]),
                        train_loss=lambda weights, aux: problem.train_loss(weights[0], {"raw": aux[0]}),
                        aux_params=problem.combiner.parameters(), parameters=[w])
    torch.testing.assert_close(grad, exact, rtol=1e-8, atol=1e-12)
    step = problem.combiner.raw.detach() - before
    torch.testing.assert_close(step, -0.5 * 1e-3 * grad / grad.norm())  # clipped to norm 1e-3
    assert meta.last_norm.item() == pytest.approx(grad.norm().item())


def test_effective_weights_of_linear_combiner_are_its_weights():
    combiner = auxilearn.LinearCombiner(3, initial_weight=0.7)
    main, auxiliary = torch.rand(5), torch.rand(5, 3)
    torch.testing.assert_close(auxilearn.effective_weights(combiner, main, auxiliary),
                               torch.full((3,), 0.7))


def test_rotation_task_rotates_each_image_by_its_own_quarter_turns():
    images = torch.arange(2 * 4, dtype=torch.float32).view(2, 1, 2, 2)
    rotated = auxilearn.rotate(images, torch.tensor([1, 2]))
    torch.testing.assert_close(rotated[0], torch.rot90(images[0], 1, dims=(-2, -1)))
    torch.testing.assert_close(rotated[1], torch.rot90(images[1], 2, dims=(-2, -1)))


# ----------------------------------------------------------------------------- end to end

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHORT = {"teaching.steps": 400, "teaching.warmup_steps": 50, "teaching.log_interval": 100,
         "device": "cpu", "seed": 0}


def run_algorithm(name, tmp_path, **overrides):
    import train
    return train.main([ROOT / "configs" / "digits_teaching.yaml", ROOT / "configs" / f"{name}.yaml"],
                      {**SHORT, **overrides}, log_root=tmp_path, progress=False)


def test_learned_weighting_beats_its_equal_weighting_initialisation(tmp_path):
    learned = run_algorithm("AuxiLearn_Linear", tmp_path)
    equal = run_algorithm("AuxiLearn_EqualWeighting", tmp_path)
    assert learned["status"] == equal["status"] == "finished"
    assert learned["algorithm"] == "AuxiLearn_Linear" and learned["seed"] == 0
    # Same seed, same data order: only the auxiliary-weight updates differ.
    assert learned["objective"] < 0.6 * equal["objective"]
    assert learned["final"]["Loss/Auxiliary_Set"] < equal["final"]["Loss/Auxiliary_Set"]
    weights = learned["teaching"]["auxiliary_weights"]
    assert weights["noisy_labels"] < 0.3 < 1.0 < weights["parity"]  # label noise turned down
    assert equal["teaching"]["auxiliary_weights"] == pytest.approx({"parity": 1.0, "rotation": 1.0,
                                                        "noisy_labels": 1.0}, abs=1e-6)

    run_dir = pathlib.Path(learned["run_dir"])
    assert (run_dir / "results.json").is_file() and (run_dir / "auxiliary_weights.png").stat().st_size > 1000
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    noisy = events.Scalars("Auxiliary/Weight_Noisy_Labels")
    assert [e.step for e in noisy] == [100, 200, 300, 400]
    assert noisy[0].value > noisy[-1].value == pytest.approx(weights["noisy_labels"], rel=1e-5)
    assert events.Scalars("Final/Loss/Validation")[-1].value == pytest.approx(learned["objective"], rel=1e-6)
    assert "Commentary/auxiliary_weights" in events.Tags()["images"]
    assert len(events.Scalars("Hypergradient/Norm")) == 4
    saved = storage.load_teacher(run_dir / "teacher.pt", method="AuxiLearn")
    combiner = auxilearn.LinearCombiner(3)
    combiner.load_state_dict(saved["tensors"])
    assert combiner.weights().tolist() == pytest.approx([weights[t] for t in saved["teacher"]["auxiliary_tasks"]],
                                                        rel=1e-6)


def test_nonlinear_combiner_and_main_task_only_baseline(tmp_path):
    nonlinear = run_algorithm("AuxiLearn_Nonlinear", tmp_path)
    alone = run_algorithm("AuxiLearn_NoAuxiliary", tmp_path)
    assert nonlinear["final"]["Accuracy/Test"] > 0.85 and alone["final"]["Accuracy/Test"] > 0.85
    assert nonlinear["teaching"]["auxiliary_weights"]["noisy_labels"] < 0.1
    assert alone["teaching"]["auxiliary_weights"] == {} and alone["teacher_file"] is None
    assert not (pathlib.Path(alone["run_dir"]) / "auxiliary_weights.png").exists()


def test_main_task_only_network_has_only_the_main_head():
    model = auxilearn.MultiTaskNet(64, 8, [])
    assert list(model.heads) == ["main"]
    assert list(auxilearn.MultiTaskNet(64, 8, ["noisy_labels", "parity"]).heads) == ["main", "parity"]


@pytest.mark.parametrize("override, key", [
    ({"teaching.auxiliary_tasks": ["parity", "colour"]}, "teaching.auxiliary_tasks"),
    ({"teaching.auxiliary_tasks": "parity"}, "teaching.auxiliary_tasks"),
    ({"teaching.combiner": "quadratic"}, "teaching.combiner"),
    ({"teaching.neumann_steps": 0}, "teaching.neumann_steps"),
    ({"teaching.momentum": 1.5}, "teaching.momentum"),
    ({"teaching.train_size": 5000}, "teaching.train_size"),
])
def test_bad_options_are_user_errors(tmp_path, override, key):
    with pytest.raises(UserError, match=key):
        run_algorithm("AuxiLearn_Linear", tmp_path, **override)


def test_command_line_reports_bad_option_in_one_line(tmp_path):
    import subprocess
    import sys
    completed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "digits_teaching.yaml"),
         str(ROOT / "configs" / "AuxiLearn_Linear.yaml"), "-l", str(tmp_path), "-q",
         "--set", "teaching.combiner=cubic"], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "teaching.combiner" in completed.stderr
