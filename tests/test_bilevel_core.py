"""The core's two hypergradients, ``hypergradients.implicit`` and
``hypergradients.unrolled``, with outer variables that enter the training
*loss* (as a commentary, an example weight or an auxiliary weighting does),
checked in float64 against exact values and finite differences, chunked and
truncated, and vmapped over a population of outer variables."""
import pytest
import torch
from torch.func import vmap

import hypergradients
import linear_solvers
from hypergradients import gradient_step, implicit, unrolled



@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

SOLVERS = {"neumann": (linear_solvers.neumann, 3000), "cg": (linear_solvers.conjugate_gradient, 4)}


def quadratic_problem(seed=0, n=4, m=3):
    """``L_T(w, θ) = ½ wᵀAw - θᵀBw`` (θ enters the loss), so ``w*(θ) = A⁻¹Bᵀθ``;
    ``L_V(w, θ) = ½|w - c|² + ½|θ|²`` has a direct term. Exact:
    ``dL_V/dθ = θ + B A⁻¹ (w* - c)``."""
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=g)
    A = root @ root.T + n * torch.eye(n)
    B = torch.randn(m, n, generator=g)
    c = torch.randn(n, generator=g)
    theta = torch.randn(m, generator=g)

    def inner(weights, outer):
        w = weights["w"]
        return 0.5 * w @ A @ w - outer["theta"] @ B @ w

    def outer_objective(weights, outer):
        return 0.5 * ((weights["w"] - c) ** 2).sum() + 0.5 * (outer["theta"] ** 2).sum()

    def solution(theta):
        return {"w": torch.linalg.solve(A, B.T @ theta)}

    def exact(theta):
        return theta + B @ torch.linalg.solve(A, solution(theta)["w"] - c)

    lr = 1.0 / torch.linalg.eigvalsh(A).max().item()
    return inner, outer_objective, solution, exact, theta, lr


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_implicit_is_exact_at_the_fixed_point_with_theta_in_the_loss(solver):
    inner, outer_objective, solution, exact, theta, lr = quadratic_problem()
    solve, iterations = SOLVERS[solver]
    result = implicit(gradient_step(inner, lr), outer_objective, solution(theta),
                      {"theta": theta}, solve=solve, iterations=iterations)
    torch.testing.assert_close(result.gradient["theta"], exact(theta), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.inner["w"], solution(theta)["w"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.value, outer_objective(solution(theta), {"theta": theta}))


def test_implicit_matches_finite_differences_of_the_solution_map():
    inner, outer_objective, solution, _, theta, lr = quadratic_problem(seed=1)
    result = implicit(gradient_step(inner, lr), outer_objective, solution(theta), {"theta": theta},
                      solve=linear_solvers.conjugate_gradient, iterations=4)

    def total(t):
        return outer_objective(solution(t), {"theta": t})

    eps = 1e-6
    numeric = torch.stack([(total(theta + eps * e) - total(theta - eps * e)) / (2 * eps)
                           for e in torch.eye(len(theta))])
    torch.testing.assert_close(result.gradient["theta"], numeric, rtol=1e-7, atol=1e-8)


def test_implicit_closed_form_linearisation_equals_the_vjp_route():
    """The optional fast path (``linearise``) gives the same numbers as one
    ``vjp`` of the update, here for the gradient step itself: ``v ↦ v - lr vA``
    and ``x ↦ lr x Bᵀ``."""
    inner, outer_objective, solution, _, theta, lr = quadratic_problem(seed=2)
    update = gradient_step(inner, lr)
    A = torch.func.hessian(lambda w: inner({"w": w}, {"theta": theta}))(solution(theta)["w"])
    B = -torch.func.jacrev(lambda t: torch.func.grad(
        lambda w: inner({"w": w}, {"theta": t}))(solution(theta)["w"]))(theta).T

    def linearise(weights, outer):
        updated, aux = update(weights, outer)
        return (updated, lambda v: {"w": v["w"] - lr * v["w"] @ A},
                lambda x: {"theta": lr * B @ x["w"]}, aux)

    common = dict(solve=linear_solvers.neumann, iterations=7)
    by_vjp = implicit(update, outer_objective, solution(theta), {"theta": theta}, **common)
    closed = implicit(None, outer_objective, solution(theta), {"theta": theta},
                      linearise=linearise, **common)
    torch.testing.assert_close(closed.gradient["theta"], by_vjp.gradient["theta"],
                               rtol=1e-12, atol=1e-12)


def test_one_term_neumann_pulls_back_to_theta_alone_with_the_same_numbers():
    """``iterations=1`` (x = b, the teaching methods' greedy setting) takes
    the vjp in θ alone; it equals the vjp in (w, θ) bit for bit, and the
    exact one-term value ``θ + lr B (w* - c)``."""
    inner, outer_objective, solution, _, theta, lr = quadratic_problem(seed=3)
    update = gradient_step(inner, lr)
    B = -torch.func.jacrev(lambda t: torch.func.grad(
        lambda w: inner({"w": w}, {"theta": t}))(solution(theta)["w"]))(theta).T
    common = dict(solve=linear_solvers.neumann, iterations=1)
    alone = implicit(update, outer_objective, solution(theta), {"theta": theta}, **common)
    both = implicit(None, outer_objective, solution(theta), {"theta": theta},
                    linearise=hypergradients._vjp_linearisation(update), **common)
    assert torch.equal(alone.gradient["theta"], both.gradient["theta"])
    assert torch.equal(alone.inner["w"], both.inner["w"]) and torch.equal(alone.value, both.value)
    b = torch.func.grad(outer_objective)(solution(theta), {"theta": theta})["w"]  # w* - c
    torch.testing.assert_close(alone.gradient["theta"], theta + lr * B @ b, rtol=1e-12, atol=1e-12)



def sgd_problem(seed=0, n=5, m=3, rows=12):
    """An inner least-squares problem whose examples are weighted by
    ``softmax(X θ')`` (θ enters the loss as example weights), trained by SGD
    with momentum; the outer objective is a validation loss."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(rows, n, generator=g), torch.randn(rows, generator=g)
    Xv, yv = torch.randn(7, n, generator=g), torch.randn(7, generator=g)
    P = torch.randn(n, m, generator=g)
    theta = 0.3 * torch.randn(m, generator=g)
    lr, momentum = 0.05, 0.9
    batches = [torch.randperm(rows, generator=g)[:6] for _ in range(9)]

    def step(state, outer, k):
        rows_k = batches[k]

        def loss(w):
            weights = torch.softmax(X[rows_k] @ P @ outer, 0) * len(rows_k)
            return (weights * (X[rows_k] @ w - y[rows_k]) ** 2).mean()

        grads, value = torch.func.grad_and_value(loss)(state["w"])
        velocity = momentum * state["velocity"] + grads
        return {"w": state["w"] - lr * velocity, "velocity": velocity}, value

    def validation(state, outer):
        return ((Xv @ state["w"] - yv) ** 2).mean()

    start = {"w": torch.randn(n, generator=g), "velocity": torch.zeros(n)}
    return step, validation, start, theta, len(batches)


def finite_difference(function, theta, eps=1e-6):
    return torch.stack([(function(theta + eps * e) - function(theta - eps * e)) / (2 * eps)
                        for e in torch.eye(len(theta))])


def final_loss(step, validation, start, steps, theta, frozen_until=0, frozen_theta=None):
    state = start
    for k in range(steps):
        state, _ = step(state, frozen_theta if k < frozen_until else theta, k)
    return validation(state, theta)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4, 9], ids=lambda c: f"chunk{c}")
def test_unrolled_matches_finite_differences_chunked_or_not(chunk_size):
    step, validation, start, theta, steps = sgd_problem()
    result = unrolled(step, start, theta, steps, validation, chunk_size=chunk_size)
    numeric = finite_difference(lambda t: final_loss(step, validation, start, steps, t), theta)
    torch.testing.assert_close(result.gradient, numeric, rtol=1e-7, atol=1e-9)
    assert len(result.aux) == steps
    torch.testing.assert_close(result.value, final_loss(step, validation, start, steps, theta))


@pytest.mark.parametrize("chunk_size", [None, 2], ids=lambda c: f"chunk{c}")
def test_truncation_differentiates_only_the_last_steps(chunk_size):
    """``truncation=T``: the gradient of the final loss with θ held fixed in
    the first ``K - T`` steps: a different, biased number, and exactly that one."""
    step, validation, start, theta, steps = sgd_problem(seed=3)
    truncated = unrolled(step, start, theta, steps, validation, truncation=3,
                         chunk_size=chunk_size)
    numeric = finite_difference(
        lambda t: final_loss(step, validation, start, steps, t, steps - 3, theta), theta)
    torch.testing.assert_close(truncated.gradient, numeric, rtol=1e-7, atol=1e-9)
    full = unrolled(step, start, theta, steps, validation)
    assert not torch.allclose(truncated.gradient, full.gradient, rtol=1e-3)
    torch.testing.assert_close(truncated.value, full.value)


@pytest.mark.parametrize("members", [1, 3], ids=lambda n: f"population{n}")
def test_vmap_over_outer_variables_equals_one_at_a_time(members):
    """Both hypergradients run batched over a population of outer variables
    (the teaching populations' shape) and give, member by member, what one
    call gives alone."""
    step, validation, start, theta, steps = sgd_problem(seed=4)
    thetas = theta + 0.1 * torch.arange(members)[:, None]
    batched = vmap(lambda t: unrolled(step, start, t, steps, validation, chunk_size=4).gradient)(
        thetas)
    for index in range(members):
        alone = unrolled(step, start, thetas[index], steps, validation, chunk_size=4).gradient
        torch.testing.assert_close(batched[index], alone, rtol=1e-12, atol=1e-14)

    inner, outer_objective, solution, exact, theta, lr = quadratic_problem()
    thetas = theta + 0.1 * torch.arange(members)[:, None]
    batched = vmap(lambda t: implicit(gradient_step(inner, lr), outer_objective, solution(t),
                                      {"theta": t}, solve=linear_solvers.conjugate_gradient,
                                      iterations=4).gradient["theta"])(thetas)
    for index in range(members):
        torch.testing.assert_close(batched[index], exact(thetas[index]), rtol=1e-9, atol=1e-10)


def test_outer_at_must_be_named():
    inner, outer_objective, solution, _, theta, lr = quadratic_problem()
    with pytest.raises(ValueError, match="outer_at"):
        implicit(gradient_step(inner, lr), outer_objective, solution(theta), {"theta": theta},
                 outer_at="weights")
