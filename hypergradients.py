"""Hypergradient methods as pure functions of a recorded stretch of training.

A hyperparameter step runs most weight updates plainly; only the last
``method.differentiable_steps`` are differentiated (:class:`Window`: start
weights and optimiser state, the natural hyperparameter values λ, the
training batches and the validation batch). Every method returns the
weights and state after the window and ``∂L_V/∂λ`` for the optimised names,
in the *natural* space; the step (:mod:`step`) applies the transforms'
chain rule to get the gradient of the raw values the outer optimiser moves
(``gradient_space: raw``, the exact gradient) or hands the natural-space
gradient over as it is (``gradient_space: natural``, as Baydin et al.'s
code does: it moves a log10 learning rate by ``-∇L_V·∇L_T`` itself).

* ``Unrolled`` (Diff-through-Opt): the exact gradient of ``L_V(w_K)``
  through all K updates, ``torch.func.grad`` of the unrolled function.
  Memory grows with K.
* ``Implicit`` (Clarke et al., ICLR 2022; Lorraine et al. 2020 when only the
  weight decay is optimised): one update ``w_1 = u(w_0, λ)`` and the
  implicit function theorem at the fixed point ``w* = u(w*, λ)``::

      dL_V/dλ = ∂L_V/∂w (I - ∂u/∂w)^{-1} ∂u/∂λ

  with ``(I - ∂u/∂w)^{-1}`` from a solver (:mod:`linear_solvers`: a
  truncated Neumann series of ``rollback_distance`` terms, as in the paper,
  or conjugate gradients). ``∂L_V/∂λ`` (the direct term) is zero for
  weight-update hyperparameters. The products with ``∂u/∂w`` and ``∂u/∂λ``
  come from the optimiser's closed-form ``linearisation`` (SGD) with one
  recorded ``vjp`` of the training gradient serving every Hessian-vector
  product, or else from one ``torch.func.vjp`` through the update itself.
* ``Baydin`` (hypergradient descent, 2018): the greedy one-term case,
  ``∂L_V(w_1)/∂w_1 · ∂u/∂λ``; for plain SGD on the learning rate this is
  ``-∇L_V(w_1) · ∇L_T(w_0)``.

Both routes are written once, for any outer variables wherever they enter
(a learning rate in the update, a commentary or an example weight in the
training loss, an auxiliary weighting), as :func:`implicit` and
:func:`unrolled`; the classes above and every teaching method
(:mod:`commentaries`) call them.

Everything is written with ``torch.func`` (``grad``, ``vjp``), with no
in-place updates and no host syncs, so the same code runs eagerly, under
``torch.compile`` and under ``torch.func.vmap`` over a population of runs.
"""
from typing import Any, Callable, NamedTuple

import torch
from torch.func import grad, grad_and_value, vjp

import linear_solvers
from registry import Registry
from trees import tree_add, tree_leaves, tree_map

METHODS = Registry("hypergradient")
GRADIENT_SPACES = ("raw", "natural")


class Window(NamedTuple):
    """The inputs of the differentiated weight updates of one hyperparameter step."""
    loss: Callable          # (weights, batch) -> scalar training/validation loss
    optimiser: object       # optimisers.WeightOptimiser
    weights: tuple          # w_0
    state: dict             # weight-optimiser state at w_0
    natural: dict           # {name: natural value} of every hyperparameter
    names: tuple            # the optimised names
    batches: list           # one training batch (inputs, targets) per update
    validation: tuple       # the validation batch


class Outcome(NamedTuple):
    weights: tuple          # w_K
    state: dict             # optimiser state after the window
    training_loss: object   # L_T of the last update (0-d tensor)
    starts: list            # the weights each update started from (for model buffers)
    cotangents: dict        # {name: ∂L_V/∂natural value}; {} without hypergradient


def _check_space(gradient_space):
    if gradient_space not in GRADIENT_SPACES:
        raise ValueError(f"`gradient_space` must be one of {', '.join(GRADIENT_SPACES)}, "
                         f"got {gradient_space!r}")
    return gradient_space


@METHODS.register("None")
class NoHypergradient:
    """Fixed hyperparameters: nothing is differentiated."""
    gradient_space = "raw"

    def differentiable_steps(self, network_weight_steps):
        return 0


@METHODS.register("Unrolled")
class Unrolled:
    """Exact hypergradient through the last ``window`` weight updates
    (``window: null``: every update of the hyperparameter step)."""

    def __init__(self, window=5, gradient_space="raw"):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"`window` must be a positive integer or null, got {window!r}")
        self.window = window
        self.gradient_space = _check_space(gradient_space)

    def differentiable_steps(self, network_weight_steps):
        if self.window is None:
            return network_weight_steps
        return min(self.window, network_weight_steps)

    def hypergradient(self, window):
        loss, optimiser = window.loss, window.optimiser

        def step(carry, optimised, k):
            weights, state = carry
            grads, value = grad_and_value(loss)(weights, window.batches[k])
            return (optimiser.update(weights, grads, state, {**window.natural, **optimised}),
                    (weights, value))

        result = unrolled(step, (window.weights, window.state), _optimised(window),
                          len(window.batches), lambda carry, _: loss(carry[0], window.validation))
        starts, values = zip(*result.aux)
        return Outcome(*result.inner, values[-1], list(starts), result.gradient)


@METHODS.register("Implicit")
class Implicit:
    """Implicit-function-theorem hypergradient through one weight update,
    with ``(I - ∂u/∂w)^{-1}`` approximated by ``solver`` in
    ``rollback_distance`` terms (Neumann) or iterations (CG).
    ``closed_form: false`` forces the autograd Jacobian products even where
    the optimiser has closed-form ones (a reference for tests)."""

    def __init__(self, rollback_distance=5, solver="neumann", closed_form=True,
                 gradient_space="raw"):
        if (isinstance(rollback_distance, bool) or not isinstance(rollback_distance, int)
                or rollback_distance < 1):
            raise ValueError(f"`rollback_distance` must be a positive integer, "
                             f"got {rollback_distance!r}")
        self.rollback_distance = rollback_distance
        self.solver = solver
        self.solve = linear_solvers.get_solver(solver)
        self.closed_form = closed_form
        self.gradient_space = _check_space(gradient_space)

    def differentiable_steps(self, network_weight_steps):
        return 1

    def uses_closed_form(self, optimiser):
        return self.closed_form and optimiser.linearisation is not None

    def hypergradient(self, window):
        if self.uses_closed_form(window.optimiser):
            return self._closed_form(window)
        return self._through_update(window)

    def _closed_form(self, window):
        """``∇L_T(w_0)`` recorded once as a ``vjp``, whose pullback is every
        Hessian-vector product ``H v`` of the solver; the update and its
        Jacobian products are closed-form."""
        (batch,), optimiser, natural = window.batches, window.optimiser, window.natural

        def linearise(weights, _):
            grads, pullback, value = vjp(lambda w: grad_and_value(window.loss)(w, batch),
                                         weights, has_aux=True)
            end, state = optimiser.update(weights, grads, window.state, natural)
            weight_product, hyperparameter_products = optimiser.linearisation(
                weights, grads, window.state, natural, state)
            return (end, lambda v: weight_product(v, lambda x: pullback(x)[0]),
                    lambda x: hyperparameter_products(x, window.names), (state, value))

        return self._implicit(window, None, linearise)

    def _through_update(self, window):
        """One ``vjp`` of the whole update ``(w, λ) -> u(w, λ)``: its pullback
        gives both ``v ∂u/∂w`` (for the solver) and ``x ∂u/∂λ``."""
        (batch,), optimiser = window.batches, window.optimiser

        def update(weights, optimised):
            grads, value = grad_and_value(window.loss)(weights, batch)
            end, state = optimiser.update(weights, grads, window.state,
                                          {**window.natural, **optimised})
            return end, (state, value)

        return self._implicit(window, update, None)

    def _implicit(self, window, update, linearise):
        result = implicit(update, lambda weights, _: window.loss(weights, window.validation),
                          window.weights, _optimised(window), solve=self.solve,
                          iterations=self.rollback_distance, linearise=linearise,
                          outer_at="update")
        state, value = result.aux
        return Outcome(result.inner, state, value, [window.weights], result.gradient)


def _optimised(window):
    return {name: window.natural[name] for name in window.names}


@METHODS.register("Baydin")
class Baydin(Implicit):
    """Greedy one-step hypergradient (hypergradient descent).
    ``gradient_space: natural`` hands the outer optimiser the natural-space
    hypergradient as the gradient of the stored value, as the paper's code
    does; ``raw`` (default) is the exact chain rule through the transform."""

    def __init__(self, gradient_space="raw"):
        super().__init__(rollback_distance=1, solver="neumann", gradient_space=gradient_space)

    def check_optimised(self, names):
        """The reason ``names`` cannot be optimised by this method, or None."""
        if self.gradient_space == "natural" and list(names) != ["lr"]:
            return (f"gradient_space: natural optimises the learning rate alone "
                    f"(optimised_hyperparameters: [lr]), got {list(names)}")
        return None

    def hypergradient(self, window):
        """``natural``: as the paper's code (``BaydinHypergradientDescent``)
        and Baydin et al.'s SGD-HD, the loss gradients alone,
        ``-∇L_V(w_1) · ∇L_T(w_0)`` (elementwise for a per-weight lr), whatever
        the momentum and weight decay; no second-order term is needed."""
        if self.gradient_space == "raw":
            return super().hypergradient(window)
        (batch,), optimiser = window.batches, window.optimiser
        grads, value = grad_and_value(window.loss)(window.weights, batch)
        end, state = optimiser.update(window.weights, grads, window.state, window.natural)
        validation_grad = grad(window.loss)(end, window.validation)
        products = tuple(-v * g for v, g in zip(validation_grad, grads))
        lr = (products if isinstance(window.natural["lr"], tuple)
              else sum(p.sum() for p in products))
        return Outcome(end, state, value, [window.weights], {"lr": lr})


# ---------------------------------------------------------------------------
# The two hypergradients, for any outer variables


class Hypergradient(NamedTuple):
    value: Any       # the outer objective (a 0-d tensor)
    gradient: Any    # d(outer objective)/d(outer variables), shaped like them
    inner: Any       # the inner state the outer objective was evaluated at
    aux: Any         # the update's aux (implicit) or the list of steps' auxes (unrolled)


def gradient_step(inner_objective, lr):
    """The fixed-point map of an inner objective, ``u(w, θ) = w - lr ∇_w L(w, θ)``
    (aux: ``L(w, θ)``). Its fixed points are the stationary points of ``L``,
    and ``(I - ∂u/∂w)^{-1} ∂u/∂θ = -H^{-1} ∂²L/∂w∂θ``, so the implicit
    hypergradient through it does not depend on ``lr`` when solved exactly;
    the truncated Neumann series (Lorraine et al.) does, through its terms
    ``(I - lr H)^j``."""
    def update(weights, outer):
        grads, value = grad_and_value(inner_objective)(weights, outer)
        return tree_map(lambda w, g: w - lr * g, weights, grads), value
    return update


def _vjp_linearisation(update, weight_products=True):
    """One ``torch.func.vjp`` of ``update``; without ``weight_products`` (a
    solver that never multiplies by ``∂u/∂w``) the vjp is taken in ``θ``
    alone, so its pullback skips the weight cotangent (a Hessian-vector
    product through the inner gradient) that nothing would use."""
    def linearise(weights, outer):
        if not weight_products:
            updated, pullback, aux = vjp(lambda o: update(weights, o), outer, has_aux=True)
            return updated, None, lambda v: pullback(v)[0], aux
        updated, pullback, aux = vjp(update, weights, outer, has_aux=True)
        return updated, lambda v: pullback(v)[0], lambda v: pullback(v)[1], aux
    return linearise


def implicit(update, outer_objective, solution, outer, *, solve=linear_solvers.neumann,
             iterations=5, linearise=None, outer_at="solution"):
    """The implicit-function-theorem hypergradient at a fixed point
    ``w* = u(w*, θ)`` of the inner update::

        dL_V/dθ = ∂L_V/∂θ + ∂L_V/∂w · (I - ∂u/∂w)^{-1} · ∂u/∂θ

    * ``update(w, θ) -> (w', aux)``: the inner fixed-point map (use
      :func:`gradient_step` for an inner objective);
    * ``outer_objective(w, θ) -> scalar`` (``L_V``; it may ignore ``θ``);
    * ``solution``: ``w*`` (a tree of tensors), ``outer``: ``θ`` (a tree);
    * ``solve(vjp, b, iterations)``: a :mod:`linear_solvers` solver for
      ``x (I - ∂u/∂w) = b`` with ``b = ∂L_V/∂w``;
    * ``linearise(w, θ) -> (w', v ↦ v ∂u/∂w, x ↦ x ∂u/∂θ, aux)``: closed-form
      Jacobian products (SGD's fast path); by default one ``torch.func.vjp``
      of ``update`` serves both;
    * ``outer_at``: ``"solution"`` evaluates ``∂L_V`` at ``w*``;
      ``"update"`` at ``u(w*, θ)``: the hyperparameter methods linearise the
      update at the weights the step started from and evaluate the
      validation loss after it (Clarke et al.'s one-update step).

    Returns :class:`Hypergradient` with ``inner = u(w*, θ)`` and the update's aux.
    """
    if outer_at not in ("solution", "update"):
        raise ValueError(f"`outer_at` must be 'solution' or 'update', got {outer_at!r}")
    # a one-term Neumann series is x = b: no products with ∂u/∂w
    one_term = solve is linear_solvers.neumann and iterations == 1
    linearise = linearise or _vjp_linearisation(update, weight_products=not one_term)
    updated, weight_vjp, outer_vjp, aux = linearise(solution, outer)
    at = updated if outer_at == "update" else solution
    (weight_grad, direct), value = grad_and_value(outer_objective, argnums=(0, 1))(at, outer)
    flat, unflat = _flattener(solution)
    x, _ = solve(lambda v: flat(weight_vjp(unflat(v))), flat(weight_grad), iterations)
    return Hypergradient(value, tree_add(direct, outer_vjp(unflat(x))), updated, aux)


def unrolled(step, state, outer, steps, outer_objective, *, chunk_size=None, truncation=None):
    """The exact gradient of ``outer_objective(s_K, θ)`` with respect to ``θ``
    through ``s_{k+1}, aux_k = step(s_k, θ, k)`` for ``k < steps``
    (Diff-through-Opt; Raghu et al.'s Algorithm 1; GTN).

    ``state`` is a tree of floating tensors (weights, optimiser state). Two
    memory bounds (``None`` = off):

    * ``truncation=T``: differentiate through the last ``T`` steps only (a
      biased, cheaper estimate; the first steps run on detached inputs);
    * ``chunk_size=C``: exact gradient checkpointing: the forward pass keeps
      every ``C``-th state; the backward pass recomputes one chunk at a time
      and pulls the adjoint through it with one ``vjp``, so the peak holds
      one chunk's graph instead of all ``K`` steps'. ``step`` must then be
      deterministic in ``k`` (batches drawn up front), so a recomputed chunk
      is the chunk that ran.

    Returns :class:`Hypergradient` with the final state and the forward pass's auxes.
    """
    first = 0
    if truncation and truncation < steps:
        first = steps - truncation
        state, _ = _run(step, _detached(state), _detached(outer), 0, first)
    if not chunk_size or chunk_size >= steps - first:
        def objective(outer):
            final, auxes = _run(step, state, outer, first, steps)
            value = outer_objective(final, outer)
            return value, (value, final, auxes)
        gradient, (value, final, auxes) = grad(objective, has_aux=True)(outer)
        return Hypergradient(value, gradient, final, auxes)

    boundaries, auxes, constant = [], [], _detached(outer)
    for start in range(first, steps, chunk_size):
        end = min(start + chunk_size, steps)
        boundaries.append((start, end, state))
        state, chunk_auxes = _run(step, _detached(state), constant, start, end)
        auxes += chunk_auxes
    (adjoint, gradient), value = grad_and_value(outer_objective, argnums=(0, 1))(state, outer)
    for start, end, start_state in reversed(boundaries):
        _, pullback = vjp(lambda s, o: _run(step, s, o, start, end)[0], start_state, outer)
        adjoint, chunk_gradient = pullback(adjoint)
        gradient = tree_add(gradient, chunk_gradient)
    return Hypergradient(value, gradient, state, auxes)


def _run(step, state, outer, first, last):
    auxes = []
    for k in range(first, last):
        state, aux = step(state, outer, k)
        auxes.append(aux)
    return state, auxes


def _detached(tree):
    return tree_map(lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, tree)


def _flattener(tree):
    """``(flatten, unflatten)`` between trees shaped like ``tree`` and the
    tuples of tensors the linear solvers work on."""
    def unflatten(leaves):
        remaining = iter(leaves)
        return tree_map(lambda _: next(remaining), tree)
    return lambda t: tuple(tree_leaves(t)), unflatten
