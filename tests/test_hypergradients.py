"""Hypergradients against references, in float64.

* the differentiable optimisers against ``torch.optim`` step for step;
* Unrolled (Diff-through-Opt) against central finite differences;
* Implicit (Neumann, CG) against the exact implicit hypergradient of a
  quadratic training loss, converging as the rollback distance grows;
* Baydin against its closed form; per-weight learning rates against the scalar one.
"""
import gc
import warnings

import pytest
import torch

import hypergradients
import hyperparameters as hp
import linear_solvers
from optimisers import HYPERPARAMETER_OPTIMISERS, OPTIMISERS

TRANSFORMS = {"lr": "10^", "weight_decay": "10^", "momentum": "sigmoid"}


def make_raw(values, high_dimensional=(), shapes=((3, 4), (3,)), dtype=torch.float64):
    return hp.initial_raw(values, high_dimensional=high_dimensional, weight_shapes=list(shapes),
                          device="cpu", dtype=dtype)


def regression_problem(seed=0, dtype=torch.float64):
    """A tiny nonlinear regression: y = tanh(x W^T + b) summed, 3 hidden units."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(32, 4, generator=generator, dtype=dtype)
    targets = torch.randn(32, 1, generator=generator, dtype=dtype)
    weights = (0.5 * torch.randn(3, 4, generator=generator, dtype=dtype),
               0.1 * torch.randn(3, generator=generator, dtype=dtype))

    def loss(weights, batch):
        x, y = batch
        prediction = torch.tanh(x @ weights[0].T + weights[1]).sum(-1, keepdim=True)
        return ((prediction - y) ** 2).mean()

    batches = [(inputs[i:i + 8], targets[i:i + 8]) for i in range(0, 24, 8)]
    validation = (inputs[24:], targets[24:])
    return weights, loss, batches, validation


def raw_gradients(method, outcome, natural, transforms, names):
    """The method's outcome as a flat list of raw-value gradients (per-weight
    values expanded), in ``names`` order."""
    grads = outcome.cotangents
    if method.gradient_space == "raw":
        grads = hp.natural_vjp(grads, natural, transforms)
    flat = []
    for name in names:
        flat.extend(grads[name] if isinstance(grads[name], tuple) else [grads[name]])
    return flat


def hypergradient_of(method, values, optimised, steps, seed=0, momentum_buffer=0.3,
                     transforms=TRANSFORMS, high_dimensional=()):
    weights, loss, batches, validation = regression_problem(seed)
    optimiser = OPTIMISERS.get("SGD")()
    state = {"momentum_buffer": tuple(momentum_buffer * torch.ones_like(w) for w in weights)}
    natural = hp.natural(make_raw(values, high_dimensional), transforms)
    window = hypergradients.Window(loss, optimiser, weights, state, natural, tuple(optimised),
                                   [batches[i % len(batches)] for i in range(steps)], validation)
    outcome = method.hypergradient(window)
    return raw_gradients(method, outcome, natural, transforms, optimised), outcome


def validation_after(values, steps, seed=0, momentum_buffer=0.3):
    with torch.no_grad():
        weights, loss, batches, validation = regression_problem(seed)
        optimiser = OPTIMISERS.get("SGD")()
        state = {"momentum_buffer": tuple(momentum_buffer * torch.ones_like(w) for w in weights)}
        natural = hp.natural(make_raw(values), TRANSFORMS)
    for i in range(steps):
        grads = torch.func.grad(loss)(weights, batches[i % len(batches)])
        weights, state = optimiser.update(weights, grads, state, natural)
    return loss(weights, validation).item()


VALUES = {"lr": -1.0, "weight_decay": -2.0, "momentum": 0.5}


@pytest.mark.parametrize("steps", [1, 5, 12], ids=lambda k: f"K{k}")
def test_unrolled_matches_central_finite_differences(steps):
    names = ["lr", "weight_decay", "momentum"]
    grads, _ = hypergradient_of(hypergradients.Unrolled(window=steps), VALUES, names, steps)
    epsilon = 1e-6
    for name, grad in zip(names, grads):
        up = dict(VALUES, **{name: VALUES[name] + epsilon})
        down = dict(VALUES, **{name: VALUES[name] - epsilon})
        finite = (validation_after(up, steps) - validation_after(down, steps)) / (2 * epsilon)
        assert grad.item() == pytest.approx(finite, rel=1e-6 * steps, abs=1e-10), name
        assert abs(finite) > 1e-6, f"{name}: the check must not be vacuous"


def test_implicit_with_one_term_equals_one_step_unrolled():
    names = ["lr", "weight_decay", "momentum"]
    implicit, _ = hypergradient_of(hypergradients.Implicit(rollback_distance=1), VALUES, names, 1)
    unrolled, _ = hypergradient_of(hypergradients.Unrolled(window=1), VALUES, names, 1)
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rollback", [1, 5])
@pytest.mark.parametrize("per_weight", [False, True], ids=["scalar_lr", "per_weight_lr"])
@pytest.mark.parametrize("optimised", [["lr", "weight_decay", "momentum"], ["weight_decay"]],
                         ids=["all", "weight_decay_only"])
@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_closed_form_jacobian_products_equal_autograd(rollback, per_weight, optimised, solver):
    """SGD's closed-form products (one recorded vjp of the training gradient)
    against one ``torch.func.vjp`` through the whole update."""
    high_dimensional = ["lr"] if per_weight and "lr" in optimised else []
    fast, _ = hypergradient_of(hypergradients.Implicit(rollback, solver), VALUES, optimised, 1,
                               high_dimensional=high_dimensional)
    slow, _ = hypergradient_of(hypergradients.Implicit(rollback, solver, closed_form=False),
                               VALUES, optimised, 1, high_dimensional=high_dimensional)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("transform", ["10^", "exp", "sigmoid", None], ids=str)
@pytest.mark.parametrize("per_weight", [False, True], ids=["scalar", "per_weight"])
def test_closed_form_transform_derivatives_equal_autograd(transform, per_weight):
    raw = make_raw({"lr": -0.7, "weight_decay": 0.3, "momentum": 1.2},
                   high_dimensional=["lr"] if per_weight else [])
    transforms = {name: transform for name in raw}
    generator = torch.Generator().manual_seed(1)
    natural = hp.natural(raw, transforms)
    cotangents = {name: (tuple(torch.randn(v.shape, generator=generator, dtype=v.dtype)
                               for v in value) if isinstance(value, tuple)
                         else torch.randn((), generator=generator, dtype=value.dtype))
                  for name, value in natural.items()}
    _, pullback = torch.func.vjp(lambda r: hp.natural(r, transforms), raw)
    (expected,) = pullback(cotangents)
    ours = hp.natural_vjp(cotangents, natural, transforms)
    def flat(grads):
        return [t for v in grads.values() for t in (v if isinstance(v, tuple) else (v,))]

    assert len(flat(ours)) == (4 if per_weight else 3)
    for a, b in zip(flat(ours), flat(expected)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0.0)


def test_baydin_matches_closed_form():
    """Plain SGD, natural learning rate: dL_V(w_1)/dα = -∇L_V(w_1) · ∇L_T(w_0)."""
    values = {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0}
    transforms = {}
    (grad,), _ = hypergradient_of(hypergradients.Baydin(), values, ["lr"], 1,
                                  momentum_buffer=0.0, transforms=transforms)
    weights, loss, batches, validation = regression_problem()
    w0 = tuple(w.detach().requires_grad_() for w in weights)
    training_grad = torch.autograd.grad(loss(w0, batches[0]), w0)
    w1 = tuple((a - 0.1 * g).detach().requires_grad_() for a, g in zip(w0, training_grad))
    validation_grad = torch.autograd.grad(loss(w1, validation), w1)
    closed_form = -sum((v * t).sum() for v, t in zip(validation_grad, training_grad))
    torch.testing.assert_close(grad, closed_form, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["Unrolled", "Implicit"])
def test_per_weight_learning_rates_sum_to_the_scalar_one(method):
    names = ["lr", "weight_decay", "momentum"]
    make = {"Unrolled": lambda: hypergradients.Unrolled(window=4),
            "Implicit": lambda: hypergradients.Implicit(rollback_distance=5)}[method]
    steps = make().differentiable_steps(4)
    scalar, _ = hypergradient_of(make(), VALUES, names, steps)
    per_weight, _ = hypergradient_of(make(), VALUES, names, steps, high_dimensional=["lr"])
    assert [g.shape for g in per_weight[:2]] == [torch.Size([3, 4]), torch.Size([3])]
    torch.testing.assert_close(per_weight[0].sum() + per_weight[1].sum(), scalar[0],
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.stack(per_weight[2:]), torch.stack(scalar[1:]),
                               rtol=1e-10, atol=1e-14)


def quadratic_problem(dimension=6, seed=0):
    """L_T(w) = ½ (w - c)ᵀ A (w - c), L_V(w) = ½ |w - t|², SGD with weight decay κ:
    fixed point w* = (A + κI)^{-1} A c, and
    dL_V/dκ = -(w* - t)ᵀ (A + κI)^{-1} w*  (exact implicit hypergradient)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dimension, dimension, generator=generator,
                                           dtype=torch.float64))
    eigenvalues = torch.linspace(0.2, 2.0, dimension, dtype=torch.float64)
    curvature = basis @ torch.diag(eigenvalues) @ basis.T
    centre = torch.randn(dimension, generator=generator, dtype=torch.float64)
    target = torch.randn(dimension, generator=generator, dtype=torch.float64)
    decay = 0.1
    system = curvature + decay * torch.eye(dimension, dtype=torch.float64)
    optimum = torch.linalg.solve(system, curvature @ centre)
    exact = -(optimum - target) @ torch.linalg.solve(system, optimum)

    def training_loss(weights, batch):
        difference = weights[0] - centre
        return 0.5 * difference @ curvature @ difference

    def validation_loss(weights):
        return 0.5 * ((weights[0] - target) ** 2).sum()

    return optimum, training_loss, validation_loss, decay, exact


def implicit_on_quadratic(terms, solver, lr=0.8, closed_form=True):
    optimum, training_loss, validation_loss, decay, exact = quadratic_problem()
    natural = {"lr": torch.tensor(lr, dtype=torch.float64),
               "weight_decay": torch.tensor(decay, dtype=torch.float64),
               "momentum": torch.tensor(0.0, dtype=torch.float64)}
    optimiser = OPTIMISERS.get("SGD")()

    def loss(weights, split):
        return training_loss(weights, None) if split == "training" else validation_loss(weights)

    window = hypergradients.Window(loss, optimiser, (optimum,), optimiser.init((optimum,)),
                                   natural, ("lr", "weight_decay"), ["training"], "validation")
    method = hypergradients.Implicit(rollback_distance=terms, solver=solver,
                                     closed_form=closed_form)
    cotangents = method.hypergradient(window).cotangents
    return cotangents["lr"], cotangents["weight_decay"], exact


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "autograd"])
@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_implicit_converges_to_exact_implicit_hypergradient(solver, closed_form):
    # Neumann: terms of the series; CG: iterations (exact after n = 6 in exact arithmetic).
    terms = [1, 3, 10, 30, 100] if solver == "neumann" else [1, 2, 4, 6]
    errors = []
    for count in terms:
        lr_grad, decay_grad, exact = implicit_on_quadratic(count, solver, closed_form=closed_form)
        errors.append(abs(decay_grad.item() - exact.item()))
        # At the fixed point the weights do not depend on the learning rate.
        assert abs(lr_grad.item()) < 1e-10
    if solver == "neumann":  # CG's error need not fall monotonically, only reach 0 at n
        assert all(later <= earlier + 1e-15 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2, "one term must be far from exact, or the test is vacuous"
    assert errors[-1] < 1e-8 * max(1.0, abs(exact.item()))


def test_linear_solvers_reject_bad_step_counts():
    from errors import UserError
    with pytest.raises(UserError, match="steps"):
        linear_solvers.neumann(lambda v: v, (torch.ones(2),), 0)


def test_baydin_natural_gradient_space_skips_the_transform():
    """``gradient_space: natural`` (the paper's code): the outer optimiser
    gets ``-∇L_V(w_1)·∇L_T(w_0)`` itself as the gradient of the stored log10
    learning rate; ``raw`` gets it times ``lr·ln 10``."""
    values = {"lr": -1.0, "weight_decay": -30.0, "momentum": -30.0}
    (raw,), _ = hypergradient_of(hypergradients.Baydin(), values, ["lr"], 1,
                                 momentum_buffer=0.0)
    (natural,), _ = hypergradient_of(hypergradients.Baydin(gradient_space="natural"), values,
                                     ["lr"], 1, momentum_buffer=0.0)
    torch.testing.assert_close(raw, natural * 0.1 * torch.log(torch.tensor(10.0,
                                                                          dtype=torch.float64)),
                               rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="gradient_space"):
        hypergradients.Baydin(gradient_space="log")


@pytest.mark.parametrize("optimiser_name", ["SGD", "Adam"])
@pytest.mark.parametrize("per_weight", [False, True], ids=["scalar", "per_weight"])
def test_differentiable_optimisers_match_torch_optim(optimiser_name, per_weight):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = model.double()
    inputs, targets = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1,
                                                                          dtype=torch.float64)
    weights = tuple(p.detach().clone() for p in model.parameters())
    if optimiser_name == "SGD":
        reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        hypers = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    else:
        reference = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                     weight_decay=0.01)
        hypers = {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.01}
    hypers = {k: torch.tensor(v, dtype=torch.float64) for k, v in hypers.items()}
    if per_weight:
        hypers["lr"] = tuple(torch.full_like(w, hypers["lr"].item()) for w in weights)
    optimiser = OPTIMISERS.get(optimiser_name)()
    state = optimiser.init(weights)
    names = [name for name, _ in model.named_parameters()]

    def loss(w):
        output = torch.func.functional_call(model, dict(zip(names, w)), (inputs,))
        return torch.nn.functional.mse_loss(output, targets)

    for _ in range(7):
        reference.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        reference.step()
        weights, state = optimiser.update(weights, torch.func.grad(loss)(weights), state, hypers)
        for ours, theirs in zip(weights, model.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("per_weight", [False, True], ids=["scalar", "per_weight"])
def test_sgd_update_is_its_formula_bit_for_bit_and_leaves_its_inputs_alone(per_weight):
    """The update accumulates in place into tensors it has just made: its
    inputs stay as they were, and the results are the formula's, to the bit."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (5,)]

    def tree():
        return tuple(torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes)

    weights, grads, buffers = tree(), tree(), tree()
    hypers = {name: torch.rand((), generator=generator, dtype=torch.float64)
              for name in ("lr", "momentum", "weight_decay")}
    if per_weight:
        hypers["lr"] = tuple(torch.rand(s, generator=generator, dtype=torch.float64)
                             for s in shapes)
    given = [t.clone() for t in weights + grads + buffers]
    new_weights, state = OPTIMISERS.get("SGD")().update(weights, grads,
                                                        {"momentum_buffer": buffers}, hypers)
    assert all(torch.equal(a, b) for a, b in zip(weights + grads + buffers, given))
    for index, (w, g, b) in enumerate(zip(weights, grads, buffers)):
        lr = hypers["lr"][index] if per_weight else hypers["lr"]
        buffer = hypers["momentum"] * b + (g + hypers["weight_decay"] * w)
        assert torch.equal(state["momentum_buffer"][index], buffer)
        assert torch.equal(new_weights[index], w - lr * buffer)


def count_tensors():
    gc.collect()
    with warnings.catch_warnings():  # gc also finds deprecated torch objects
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "DiffThroughOpt", "Ours_HDLR_Momentum"])
def test_memory_stays_flat_across_hyperparameter_steps(algorithm, digits_trainer):
    trainer = digits_trainer(algorithm)
    for _ in range(3):
        trainer.step()
    before = count_tensors()
    for _ in range(10):
        trainer.step()
    after = count_tensors()
    assert after <= before + 2, (before, after)
    assert all(w.grad_fn is None and not w.requires_grad for w in trainer.weights)


@pytest.mark.parametrize("name, options, reference", [
    ("Adam", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6)),
    ("SGD", {"lr": 0.01, "momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    ("SGD_plain", {"lr": 0.01}, lambda p: torch.optim.SGD(p, lr=0.01)),
], ids=["Adam", "SGD", "SGD_plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hyperparameter_optimisers_match_torch_optim(name, options, reference, dtype, tmp_path):
    """The pure outer optimisers against ``torch.optim`` step for step, with
    their state saved and loaded (``weights_only=True``) half way."""
    generator = torch.Generator().manual_seed(0)
    initial = {"a": torch.randn((), generator=generator, dtype=dtype),
               "b": tuple(torch.randn(3, 4, generator=generator, dtype=dtype) for _ in range(2))}
    optimiser = HYPERPARAMETER_OPTIMISERS.build({"class": name.split("_")[0], **options}, "test")
    params, state = initial, optimiser.init(initial)
    theirs = [initial["a"].clone().requires_grad_()] + [t.clone().requires_grad_()
                                                        for t in initial["b"]]
    expected = reference(theirs)
    for step in range(6):
        grads = {"a": torch.randn((), generator=generator, dtype=dtype),
                 "b": tuple(torch.randn(3, 4, generator=generator, dtype=dtype)
                            for _ in range(2))}
        if step == 3:
            torch.save(state, tmp_path / "outer.pt")
            state = torch.load(tmp_path / "outer.pt", weights_only=True)
        params, state = optimiser.update(params, grads, state)
        for leaf, grad in zip(theirs, [grads["a"], *grads["b"]]):
            leaf.grad = grad
        expected.step()
        tolerance = 1e-6 if dtype == torch.float32 else 1e-14
        for a, b in zip([params["a"], *params["b"]], theirs):
            torch.testing.assert_close(a, b.detach(), rtol=tolerance, atol=tolerance)
    assert not torch.equal(params["b"][0], initial["b"][0])
