"""Solvers for ``x (I - J) = b``: the linear system in every implicit hypergradient.

At a fixed point ``w* = u(w*, λ)`` of a weight update ``u`` the implicit
function theorem gives

    dL_V/dλ = ∂L_V/∂λ + ∂L_V/∂w · (I - ∂u/∂w)^{-1} · ∂u/∂λ,

so with ``J = ∂u/∂w`` and ``b = ∂L_V/∂w`` we need the row vector
``x = b (I - J)^{-1}``.  ``J`` is only available through vector-Jacobian
products ``v ↦ v J`` (one double-backward each), so the solvers below take a
function ``vjp(v) -> v J`` and never form a matrix.

For SGD, ``u(w) = w - α(∇L_T(w) + ...)`` and ``I - J = α H``: the same system is
Lorraine et al.'s ``∂L_V/∂w · H^{-1}`` scaled by ``α``; the Neumann solver then
*is* their approximation.

Vectors are tuples of tensors (one per parameter tensor).
Every solver returns ``(x, trajectory)`` where ``trajectory[k]`` is the
estimate after ``k`` vjps, so callers and tests can watch convergence.
"""
import torch

from errors import UserError


def _add(xs, ys, alpha=1.0):
    """``xs + alpha * ys`` in multi-tensor kernels (``alpha`` a number or a 0-d tensor)."""
    if isinstance(alpha, torch.Tensor):
        return tuple(torch._foreach_add(xs, torch._foreach_mul(ys, alpha)))
    return tuple(torch._foreach_add(xs, ys, alpha=alpha))


def _dot(xs, ys):
    return sum((x * y).sum() for x, y in zip(xs, ys))


def neumann(vjp, b, steps):
    """Truncated Neumann series ``x = Σ_{j=0}^{steps-1} b J^j``.

    ``steps`` counts the terms, so ``steps=1`` is ``x = b`` (no vjp: the greedy,
    one-step approximation) and ``steps`` terms cost ``steps - 1`` vjps. Converges
    to ``b (I - J)^{-1}`` when the spectral radius of ``J`` is below one, which for
    SGD means a learning rate below ``2 / λ_max(H)``: the condition under which
    training itself is stable.
    """
    if steps < 1:
        raise UserError(f"neumann: `steps` must be at least 1, got {steps}")
    term = b
    total = b
    trajectory = [total]
    for _ in range(steps - 1):
        term = vjp(term)
        total = _add(total, term)
        trajectory.append(total)
    return total, trajectory


def conjugate_gradient(vjp, b, steps, tolerance=1e-10):
    """Conjugate gradient on ``(I - J)^T x = b``, taking ``steps`` vjps at most.

    Valid when ``I - J`` is symmetric positive definite, as for SGD's update
    at a local minimum (``I - J = α(H + κ I)``). Usually needs far fewer
    products than the Neumann series on ill-conditioned problems.
    """
    if steps < 1:
        raise UserError(f"conjugate_gradient: `steps` must be at least 1, got {steps}")

    def apply(v):
        return _add(v, vjp(v), alpha=-1.0)

    x = tuple(torch.zeros_like(t) for t in b)
    residual = b
    direction = b
    residual_norm = _dot(residual, residual)
    trajectory = [x]
    for _ in range(steps):
        product = apply(direction)
        curvature = _dot(direction, product)
        step = residual_norm / curvature
        x = _add(x, direction, alpha=step)
        residual = _add(residual, product, alpha=-step)
        new_norm = _dot(residual, residual)
        trajectory.append(x)
        if bool(new_norm <= tolerance):  # one host sync per vjp, not per weight step
            break
        direction = _add(residual, direction, alpha=new_norm / residual_norm)
        residual_norm = new_norm
    return x, trajectory


SOLVERS = {"neumann": neumann, "cg": conjugate_gradient}


def get_solver(name, where="hypergradient.solver"):
    if name not in SOLVERS:
        raise UserError(f"{where}: unknown solver '{name}'; valid: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]
