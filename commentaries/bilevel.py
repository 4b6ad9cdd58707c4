"""The two hypergradient routes of the teaching methods, each written once.

* :func:`sgd_steps` -- the inner SGD loop (with optional momentum) of every
  unrolled method, its updates kept in the autograd graph or not, step by step;
* :func:`unrolled_hypergradient` -- backpropagation through ``K`` such steps
  (Raghu et al.'s Algorithm 1; GTN), optionally memory-bounded;
* :func:`implicit_hypergradient` -- the implicit function theorem at the
  current weights (Algorithm 2; AuxiLearn), with a ``linear_solvers`` solver.

Missing gradients (a loss that does not depend on some input) are zeros
through ``torch.autograd.grad(..., materialize_grads=True)``, so no
zero-filling helper is needed. The core's ``implicit``/``unrolled`` API
(issue 11) is meant to replace these two functions; their signatures are
what the teaching methods need from it.
"""
import torch

import linear_solvers


def _grad(outputs, inputs, **options):
    return torch.autograd.grad(outputs, tuple(inputs), allow_unused=True, materialize_grads=True, **options)


def sgd_steps(loss, weights, steps, lr, momentum=0.0, graph=True, on_step=None):
    """Run the SGD steps ``steps`` (step indices) on ``loss(weights, step)``:
    ``v ← μ v + ∇_w L``, ``w ← w − α v`` (``v = ∇_w L`` when ``μ = 0``).

    ``graph`` (a bool, or ``step -> bool``) says which updates stay in the
    autograd graph (``create_graph``); the others are detached, so memory
    grows only with the steps that keep a graph. ``on_step(step, weights)``
    sees the weights after each step. Returns the final weights (a dict).
    """
    weights = {name: w if w.requires_grad else w.detach().requires_grad_() for name, w in weights.items()}
    velocity = None
    with torch.enable_grad():  # inner steps need gradients even when evaluating under no_grad
        for step in steps:
            keep = graph(step) if callable(graph) else graph
            grads = torch.autograd.grad(loss(weights, step), tuple(weights.values()), create_graph=keep)
            if momentum:
                velocity = grads if velocity is None else tuple(momentum * v + g for v, g in zip(velocity, grads))
                grads = velocity
            weights = {name: w - lr * g for (name, w), g in zip(weights.items(), grads)}
            if not keep:
                weights = {name: w.detach().requires_grad_() for name, w in weights.items()}
                velocity = None if velocity is None else tuple(v.detach() for v in velocity)
            if on_step is not None:
                on_step(step, weights)
    return weights


def _detached(weights):
    return {name: w.detach().requires_grad_(True) for name, w in weights.items()}


def unrolled_hypergradient(inner_loss, outer_loss, weights, hyper, num_steps, lr, chunk_size=0, truncation=0):
    """Gradient of ``outer_loss(w_K, hyper)`` with respect to ``hyper``, where
    ``w_{k+1} = w_k - lr * ∇_w inner_loss(w_k, hyper, k)`` starts from ``weights``.

    Memory-bounded modes (``0`` = off):

    * ``chunk_size=C`` -- exact gradient checkpointing: the forward pass keeps
      only every ``C``-th weight state; the backward pass recomputes one chunk
      at a time with its graph and pulls the adjoint through it, so the peak
      holds one chunk's graph instead of ``K`` steps' graphs.
    * ``truncation=T`` -- differentiate through the last ``T`` steps only (a
      biased, cheaper estimate: the first ``K - T`` steps run without a graph).

    ``inner_loss(w, hyper, k)`` must be deterministic in ``k`` (precompute
    mini-batch indices) so a recomputed chunk is the chunk that was run.
    Returns ``(outer loss (detached), final weights (detached), hypergradient tuple)``.
    """
    hyper = tuple(hyper)
    constant = tuple(h.detach() for h in hyper)  # steps run without a graph need none to the teacher either

    def run(start_weights, first, last, through):
        loss = (lambda w, k: inner_loss(w, hyper, k)) if through else (lambda w, k: inner_loss(w, constant, k))
        return sgd_steps(loss, start_weights, range(first, last), lr, graph=through)

    weights = _detached(weights)
    first = 0
    if truncation and truncation < num_steps:
        first = num_steps - truncation
        weights = run(weights, 0, first, False)
    if not chunk_size or chunk_size >= num_steps - first:
        final = run(weights, first, num_steps, True)
        loss = outer_loss(final, hyper)
        return loss.detach(), {n: w.detach() for n, w in final.items()}, _grad(loss, hyper)

    boundaries = []
    for start in range(first, num_steps, chunk_size):
        boundaries.append((start, weights))
        weights = run(weights, start, min(start + chunk_size, num_steps), False)
    names = list(weights)
    loss = outer_loss(weights, hyper)
    adjoint_and_direct = _grad(loss, [weights[n] for n in names] + list(hyper))
    adjoint, total = adjoint_and_direct[:len(names)], list(adjoint_and_direct[len(names):])
    for start, start_weights in reversed(boundaries):
        start_weights = _detached(start_weights)
        end = run(start_weights, start, min(start + chunk_size, num_steps), True)
        grads = _grad([end[n] for n in names], [start_weights[n] for n in names] + list(hyper),
                      grad_outputs=list(adjoint))
        adjoint = grads[:len(names)]
        total = [t + g for t, g in zip(total, grads[len(names):])]
    return loss.detach(), {n: w.detach() for n, w in weights.items()}, tuple(total)


def implicit_hypergradient(validation_loss, training_loss, hyper, weights, lr, steps, solver="neumann"):
    """IFT hypergradient ``∂L_V/∂λ + ∂L_V/∂w (I - J)^{-1} ∂u/∂λ`` at the current
    weights for the SGD map ``u(w, λ) = w - lr ∇_w L_T(w, λ)``, so
    ``J = I - lr H`` and ``∂u/∂λ = -lr ∂²L_T/∂w∂λ``.

    ``validation_loss`` and ``training_loss`` are scalar tensors computed from
    the tensors ``weights`` and ``hyper`` (lists). ``steps`` is the solver's
    budget: Neumann terms (``1`` = no Hessian-vector product: Raghu et al.'s
    setting for augmentation) or CG iterations; as it grows, the result tends
    to the exact implicit hypergradient when ``lr < 2/λ_max(H)``. The direct
    term ``∂L_V/∂λ`` is included (attention masks apply to validation images
    too; it is zero for AuxiLearn). Returns the hypergradient tuple.
    """
    hyper, weights = list(hyper), list(weights)
    grads = _grad(validation_loss, weights + hyper, retain_graph=True)
    b, direct = grads[:len(weights)], grads[len(weights):]
    train_grads = torch.autograd.grad(training_loss, weights, create_graph=True)

    def vjp(vector):  # v ↦ v J = v - lr v H, one double-backward
        hessian_vector = _grad(train_grads, weights, grad_outputs=list(vector), retain_graph=True)
        return tuple(v - lr * hv for v, hv in zip(vector, hessian_vector))

    solution, _ = linear_solvers.get_solver(solver, "teaching.solver")(vjp, b, steps)
    mixed = _grad(train_grads, hyper, grad_outputs=list(solution))
    return tuple(d - lr * m for d, m in zip(direct, mixed))
