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

Vectors are tuples of tensors (one per parameter tensor). Only plain tensor
operations are used, so the solvers run under ``torch.func.vmap`` and
``torch.compile``.
Every solver returns ``(x, trajectory)`` where ``trajectory[k]`` is the
estimate after ``k`` vjps, so callers and tests can watch convergence.
"""
import torch

from errors import UserError


def _add(xs, ys, alpha=1.0):
    """``xs + alpha * ys`` (``alpha`` a number or a 0-d tensor)."""
    return tuple(x + alpha * y for x, y in zip(xs, ys))


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
    """Conjugate gradient on ``(I - J)^T x = b``, taking exactly ``steps`` vjps.

    Valid when ``I - J`` is symmetric positive definite, as for SGD's update
    at a local minimum (``I - J = α(H + κ I)``). Usually needs far fewer
    products than the Neumann series on ill-conditioned problems. Once the
    squared residual falls to ``tolerance`` the iterate is frozen by a mask
    rather than by leaving the loop: no data-dependent branch, so it runs
    under ``vmap`` (each member stops on its own) and compiles as one graph.
    """
    if steps < 1:
        raise UserError(f"conjugate_gradient: `steps` must be at least 1, got {steps}")

    def apply(v):
        return _add(v, vjp(v), alpha=-1.0)

    def keep_if(done, old, new):
        return tuple(torch.where(done, o, n) for o, n in zip(old, new))

    x = tuple(torch.zeros_like(t) for t in b)
    residual = b
    direction = b
    residual_norm = _dot(residual, residual)
    done = residual_norm <= tolerance
    trajectory = [x]
    for _ in range(steps):
        product = apply(direction)
        curvature = _dot(direction, product)
        step = residual_norm / torch.where(done, torch.ones_like(curvature), curvature)
        x = keep_if(done, x, _add(x, direction, alpha=step))
        new_residual = _add(residual, product, alpha=-step)
        new_norm = _dot(new_residual, new_residual)
        trajectory.append(x)
        ratio = new_norm / torch.where(done, torch.ones_like(residual_norm), residual_norm)
        direction = keep_if(done, direction, _add(new_residual, direction, alpha=ratio))
        residual = keep_if(done, residual, new_residual)
        residual_norm = torch.where(done, residual_norm, new_norm)
        done = done | (new_norm <= tolerance)
    return x, trajectory


SOLVERS = {"neumann": neumann, "cg": conjugate_gradient}


def get_solver(name, where="hypergradient.solver"):
    if name not in SOLVERS:
        raise UserError(f"{where}: unknown solver '{name}'; valid: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]
