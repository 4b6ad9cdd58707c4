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

Everything is written with ``torch.func`` (``grad``, ``vjp``), with no
in-place updates and no host syncs, so the same code runs eagerly, under
``torch.compile`` and under ``torch.func.vmap`` over a population of runs.
"""
from typing import Callable, NamedTuple

from torch.func import grad, grad_and_value, vjp

import linear_solvers
from registry import Registry

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

        def validation_after(optimised):
            natural = {**window.natural, **optimised}
            weights, state, starts = window.weights, window.state, []
            for batch in window.batches:
                starts.append(weights)
                grads, value = grad_and_value(loss)(weights, batch)
                weights, state = optimiser.update(weights, grads, state, natural)
            return loss(weights, window.validation), (weights, state, value, starts)

        optimised = {name: window.natural[name] for name in window.names}
        cotangents, (end, state, value, starts) = grad(validation_after, has_aux=True)(optimised)
        return Outcome(end, state, value, starts, cotangents)


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
        grads, pullback, value = vjp(lambda w: grad_and_value(window.loss)(w, batch),
                                     window.weights, has_aux=True)
        end, state = optimiser.update(window.weights, grads, window.state, natural)
        weight_product, hyperparameter_products = optimiser.linearisation(
            window.weights, grads, window.state, natural, state)
        validation_grad = grad(window.loss)(end, window.validation)
        inverse_product, _ = self.solve(
            lambda v: weight_product(v, lambda x: pullback(x)[0]), validation_grad,
            self.rollback_distance)
        return Outcome(end, state, value, [window.weights],
                       hyperparameter_products(inverse_product, window.names))

    def _through_update(self, window):
        """One ``vjp`` of the whole update ``(w, λ) -> u(w, λ)``: its pullback
        gives both ``v ∂u/∂w`` (for the solver) and ``x ∂u/∂λ``."""
        (batch,), optimiser = window.batches, window.optimiser

        def update(weights, optimised):
            grads, value = grad_and_value(window.loss)(weights, batch)
            end, state = optimiser.update(weights, grads, window.state,
                                          {**window.natural, **optimised})
            return end, (state, value)

        optimised = {name: window.natural[name] for name in window.names}
        end, pullback, (state, value) = vjp(update, window.weights, optimised, has_aux=True)
        validation_grad = grad(window.loss)(end, window.validation)
        inverse_product, _ = self.solve(lambda v: pullback(v)[0], validation_grad,
                                        self.rollback_distance)
        return Outcome(end, state, value, [window.weights], pullback(inverse_product)[1])


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
