"""AuxiLearn: implicit hypergradients against the exact Hessian solve and finite
differences at the inner optimum, the MetaOptimizer wrapper, and learning on
the embedded digits against its baselines."""
import pathlib
import types

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from commentaries import auxilearn
from errors import UserError


def make_context(tmp_path, seed=0):
    torch.manual_seed(seed)
    run_dir = pathlib.Path(tmp_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(run_dir=run_dir, writer=SummaryWriter(str(run_dir)),
                                 device=torch.device("cpu"), seed=seed, progress=False)


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

    def train_loss(self, w):
        errors = (self.x @ w).unsqueeze(1) - self.targets
        squared = errors ** 2
        return self.combiner(squared[:, 0], squared[:, 1:]) + 0.5 * self.ridge * (w * w).sum()

    def val_loss(self, w):
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

    def implicit(self, w, steps, lr):
        w = w.detach().requires_grad_()
        return auxilearn.implicit_hypergradient(self.val_loss(w), self.train_loss(w),
                                                self.combiner.parameters(), [w], lr, steps)


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
    problem = RegressionProblem(auxilearn.LinearCombiner(2))
    w = problem.minimiser().requires_grad_()
    before = problem.combiner.raw.detach().clone()
    meta = auxilearn.MetaOptimizer(torch.optim.SGD(problem.combiner.parameters(), lr=0.5),
                                   hypergradient_lr=problem.stable_lr(w.detach()), neumann_steps=500, max_grad_norm=1e-3)
    (grad,) = meta.step(val_loss=problem.val_loss(w), train_loss=problem.train_loss(w),
                        aux_params=problem.combiner.parameters(), parameters=[w])
    step = problem.combiner.raw.detach() - before
    torch.testing.assert_close(step, -0.5 * 1e-3 * grad / grad.norm())  # clipped to norm 1e-3


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
