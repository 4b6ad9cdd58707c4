"""Hypergradient methods: each turns a differentiable window of weight updates
into the gradient of a validation loss with respect to the raw hyperparameters.

The engine runs most weight steps without any graph. Only the last
``method.differentiable_steps`` updates of each hyperparameter step are
recorded (:func:`unroll`), from weights ``w_0`` (leaves) to ``w_K``, with
the hyperparameters λ as graph inputs. A method then needs one thing:

* ``Unrolled`` (Diff-through-Opt): the exact gradient of ``L_V(w_K)``
  through all K recorded updates, by reverse mode. Memory grows with K.
* ``Implicit`` (Clarke et al., ICLR 2022; Lorraine et al. 2020 when only the
  weight decay is optimised): one recorded update ``w_1 = u(w_0, λ)`` and the
  implicit function theorem at the fixed point ``w* = u(w*, λ)``::

      dL_V/dλ = ∂L_V/∂w (I - ∂u/∂w)^{-1} ∂u/∂λ

  with ``(I - ∂u/∂w)^{-1}`` from a pluggable solver (:mod:`linear_solvers`:
  a truncated Neumann series of ``rollback_distance`` terms, as in the
  paper, or conjugate gradients). ``∂L_V/∂λ`` (the direct term) is zero for
  weight-update hyperparameters and is not computed. With an optimiser that
  has a closed-form ``linearisation`` (SGD), the products with ``∂u/∂w`` and
  ``∂u/∂λ`` are formulas in the Hessian-vector product ``H x``, so only the
  training gradient is recorded (``unroll(..., linearise=True)``) and each
  Neumann term costs one double-backward through that gradient.
* ``Baydin`` (hypergradient descent, 2018): the greedy one-term case,
  ``∂L_V(w_1)/∂w_1 · ∂u/∂λ``; for plain SGD on the learning rate this is
  ``-∇L_V(w_1) · ∇L_T(w_0)``.

All methods return one gradient per raw hyperparameter leaf (zeros for a
leaf the loss does not depend on).
"""
from dataclasses import dataclass
from typing import Callable

import torch

import linear_solvers
from errors import UserError
from registry import Registry

METHODS = Registry("hypergradient")


@dataclass
class Window:
    """The recorded weight updates of one hyperparameter step."""
    start: tuple               # w_0: leaf tensors that require grad
    end: tuple                 # w_K: functions of w_0 and λ (detached when linearised)
    state: dict                # optimiser state after the window (with graph)
    hyperparameters: list      # raw hyperparameter leaves (the outer variables)
    validation_loss: Callable  # weights -> scalar validation loss on a fixed batch
    training_losses: list      # detached training loss of each recorded step
    last_grads: tuple = None   # training gradient of the last update (with graph)
    linearisation: tuple = None  # closed-form Jacobian products of a one-update window
    natural_vjp: Callable = None  # {name: ∂/∂natural} -> gradients of the raw leaves
    optimised: tuple = ()      # names of the optimised hyperparameters, in leaf order
    # weights -> ∇L_V(weights) on the same batch as ``validation_loss``; the
    # engine supplies a faster one than differentiating ``validation_loss``.
    validation_gradient: Callable = None
    # v -> H v, the training loss's Hessian at ``start`` (linearised windows)
    hessian_product: Callable = None


def leaves(weights):
    """Fresh leaf tensors (sharing storage) to start a recorded window from."""
    return tuple(w.detach().requires_grad_(True) for w in weights)


def unroll(start, state, optimiser, hyperparameters, training_loss, batches, linearise=False):
    """Run one differentiable weight update per batch from the leaf tensors
    ``start``, keeping the graph.

    ``training_loss(weights, batch)`` is the scalar loss; ``hyperparameters``
    is a :class:`hyperparameters.Hyperparameters`. The returned
    :class:`Window`'s ``validation_loss`` is filled in by the caller.

    ``linearise=True`` (one batch, an optimiser with a closed-form
    ``linearisation``) records only the training gradient: see
    :func:`linearised`.
    """
    single = len(batches) == 1 and optimiser.linearisation is not None
    if linearise:
        if not single:
            raise ValueError("linearise=True needs one batch and an optimiser with a "
                             "linearisation")

        def gradient(weights):
            loss = training_loss(weights, batches[0])
            return loss.detach(), torch.autograd.grad(loss, weights, create_graph=True)

        return linearised(start, state, optimiser, hyperparameters, gradient)
    state = {key: _detach(value) for key, value in state.items()}
    natural = hyperparameters.natural()
    weights, linearisation = start, None
    losses = []
    for batch in batches:
        loss = training_loss(weights, batch)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        if single:
            linearisation = optimiser.linearisation(weights, grads, state, natural)
        weights, state = optimiser.update(weights, grads, state, natural)
        losses.append(loss.detach())
    return _window(start, weights, state, hyperparameters, losses, grads, linearisation, natural)


def linearised(weights, state, optimiser, hyperparameters, gradient, hessian_product=None):
    """A one-update window for the closed-form implicit methods, with no
    graph through the update itself.

    ``gradient(weights) -> (loss, ∇L_T)`` gives the training gradient, with
    a graph to ``weights`` when ``hessian_product`` (``v -> H v``) is
    omitted: the products are then double-backwards through that gradient.
    Compiled steps (:mod:`compiled`) pass a functional ``hessian_product``
    instead. The update runs without a graph; the Jacobian products come
    from the optimiser's ``linearisation`` and the transforms' derivatives.
    """
    state = {key: _detach(value) for key, value in state.items()}
    natural = hyperparameters.natural_detached()
    loss, grads = gradient(weights)
    with torch.no_grad():
        end, new_state = optimiser.update(weights, grads, state, natural)
    linearisation = optimiser.linearisation(weights, grads, state, natural, new_state)
    return _window(weights, end, new_state, hyperparameters, [loss], grads, linearisation,
                   natural, hessian_product)


def _window(start, end, state, hyperparameters, losses, grads, linearisation, natural,
            hessian_product=None):
    """A :class:`Window`; a one-update window with a ``linearisation`` gets
    a Hessian-vector product (by default a double backward through ``grads``)."""
    natural_values = {name: _detach(value) for name, value in natural.items()}
    if linearisation is not None and hessian_product is None:
        hessian_product = lambda vector: _vjp(grads, start, vector)  # noqa: E731
    return Window(start, end, state, hyperparameters.leaves(), None, losses,
                  last_grads=grads, linearisation=linearisation,
                  natural_vjp=lambda cotangents: hyperparameters.natural_vjp(cotangents,
                                                                             natural_values),
                  optimised=tuple(hyperparameters.optimised), hessian_product=hessian_product)


def _detach(value):
    if isinstance(value, tuple):
        return tuple(v.detach() for v in value)
    return value.detach()


@METHODS.register("None")
class NoHypergradient:
    """Fixed hyperparameters: nothing is recorded or differentiated."""

    def differentiable_steps(self, network_weight_steps):
        return 0

    def linearises(self, optimiser):
        return False

    def hypergradient(self, window):
        raise RuntimeError("NoHypergradient has no hypergradient")


@METHODS.register("Unrolled")
class Unrolled:
    """Exact hypergradient through the last ``window`` weight updates
    (``window: null``: every update of the hyperparameter step)."""

    def __init__(self, window=5):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"`window` must be a positive integer or null, got {window!r}")
        self.window = window

    def differentiable_steps(self, network_weight_steps):
        if self.window is None:
            return network_weight_steps
        return min(self.window, network_weight_steps)

    def linearises(self, optimiser):
        return False

    def hypergradient(self, window):
        loss = window.validation_loss(window.end)
        return _vjp(loss, window.hyperparameters, retain_graph=False)


@METHODS.register("Implicit")
class Implicit:
    """Implicit-function-theorem hypergradient through one weight update,
    with ``(I - ∂u/∂w)^{-1}`` approximated by ``solver`` in
    ``rollback_distance`` terms (Neumann) or iterations (CG)."""

    def __init__(self, rollback_distance=5, solver="neumann", closed_form=True):
        if not isinstance(rollback_distance, int) or rollback_distance < 1:
            raise ValueError(f"`rollback_distance` must be a positive integer, "
                             f"got {rollback_distance!r}")
        self.rollback_distance = rollback_distance
        self.solver = solver
        self.solve = linear_solvers.get_solver(solver)
        self.closed_form = closed_form
        self.trajectory = None

    def differentiable_steps(self, network_weight_steps):
        return 1

    def linearises(self, optimiser):
        """Whether the engine may record only the training gradient (see :func:`unroll`)."""
        return self.closed_form and optimiser.linearisation is not None

    def hypergradient(self, window):
        validation_grad = _validation_gradient(window)
        if self.closed_form and window.linearisation is not None:
            return self._with_closed_form(window, validation_grad)
        if window.end[0].grad_fn is None:
            raise ValueError("closed_form=False needs a window recorded with linearise=False "
                             "(the update's own graph)")
        # v ↦ v ∂u/∂w is one double-backward through the recorded update.
        inverse_product, self.trajectory = self.solve(
            lambda v: _vjp(window.end, window.start, v), validation_grad,
            self.rollback_distance)
        return _vjp(window.end, window.hyperparameters, inverse_product)

    def _with_closed_form(self, window, validation_grad):
        grads, self.trajectory = self.closed_form_hypergradient(
            validation_grad, window.linearisation, window.hessian_product, window.natural_vjp,
            window.optimised)
        return grads

    def closed_form_hypergradient(self, validation_grad, linearisation, hessian_product,
                                  natural_vjp, optimised, training_grads=None):
        """The same computation with the optimiser's closed-form Jacobian
        products and the transforms' closed-form derivatives: only ``H x``
        needs autograd (through the gradient alone). A pure function of its
        inputs, so :mod:`compiled` traces it into one fused hyperparameter
        step. Returns ``(raw-leaf gradients, solver trajectory)``.
        ``training_grads`` (``∇L_T(w_0)``) is unused here; :class:`Baydin`
        needs it in the natural gradient space."""
        weight_product, hyperparameter_products = linearisation
        inverse_product, trajectory = self.solve(
            lambda v: weight_product(v, hessian_product), validation_grad,
            self.rollback_distance)
        return natural_vjp(hyperparameter_products(inverse_product, optimised)), trajectory


def _validation_gradient(window):
    """``∇L_V(w_K)`` at the window's end, with no graph kept."""
    if window.validation_gradient is not None:
        return window.validation_gradient(tuple(w.detach() for w in window.end))
    end = tuple(w.detach().requires_grad_(True) for w in window.end)
    return torch.autograd.grad(window.validation_loss(end), end)


def _vjp(outputs, inputs, vector=None, retain_graph=True):
    """``vector · ∂outputs/∂inputs`` (zeros where ``outputs`` do not depend on
    an input), by default keeping the graph for further products."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs=vector, retain_graph=retain_graph,
                                allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


GRADIENT_SPACES = ("raw", "natural")


@METHODS.register("Baydin")
class Baydin(Implicit):
    """Greedy one-step hypergradient (hypergradient descent).

    ``gradient_space`` says what the outer optimiser is handed as the
    gradient of the stored (raw, e.g. log10) learning rate:

    * ``raw`` (default): the exact chain rule through the update and the
      transform, ``∂L_V(w_1)/∂w_1 · ∂u/∂α · dα/d raw``. Under ``10^`` that is
      ``α ln10`` times the natural-space hypergradient, so an outer SGD with
      a fixed step barely moves a small learning rate.
    * ``natural``: what the paper's code does (``BaydinHypergradientDescent.step``
      in Clarke et al.'s ``optimisers.py``) and Baydin et al. (2018) step with:
      the natural-space hypergradient ``-∇L_V(w_1) · ∇L_T(w_0)`` (the loss
      gradients alone, whatever the momentum and weight decay), handed over
      as the gradient of the stored value. One product per weight tensor
      for a per-weight learning rate. Only the learning rate may be optimised.
    """

    def __init__(self, gradient_space="raw"):
        if gradient_space not in GRADIENT_SPACES:
            raise ValueError(f"`gradient_space` must be one of {', '.join(GRADIENT_SPACES)}, "
                             f"got {gradient_space!r}")
        super().__init__(rollback_distance=1, solver="neumann")
        self.gradient_space = gradient_space
        self.per_weight = False  # set by check_hyperparameters

    def check_hyperparameters(self, hyperparameters, where):
        """Called by the engine once the hyperparameters exist: ``natural`` is
        defined for the learning rate alone."""
        if self.gradient_space == "natural" and list(hyperparameters.optimised) != ["lr"]:
            raise UserError(f"{where}: gradient_space: natural optimises the learning rate "
                            f"alone (optimised_hyperparameters: [lr]), got "
                            f"{list(hyperparameters.optimised)}")
        self.per_weight = "lr" in hyperparameters.high_dimensional

    def hypergradient(self, window):
        if self.gradient_space == "raw":
            return super().hypergradient(window)
        return natural_learning_rate_hypergradient(_validation_gradient(window),
                                                   window.last_grads, window.hyperparameters)

    def closed_form_hypergradient(self, validation_grad, linearisation, hessian_product,
                                  natural_vjp, optimised, training_grads=None):
        if self.gradient_space == "raw":
            return super().closed_form_hypergradient(validation_grad, linearisation,
                                                     hessian_product, natural_vjp, optimised)
        products = torch._foreach_mul(validation_grad, training_grads)
        torch._foreach_neg_(products)
        return (list(products) if self.per_weight else [sum(p.sum() for p in products)]), None


def natural_learning_rate_hypergradient(validation_grad, training_grads, leaves):
    """``-∇L_V(w_1) · ∇L_T(w_0)`` per learning-rate leaf: one 0-d tensor for
    a scalar learning rate, ``-∇L_V ⊙ ∇L_T`` per weight tensor for per-weight ones."""
    with torch.no_grad():
        products = [-(v * t.detach()) for v, t in zip(validation_grad, training_grads)]
    if len(leaves) == 1 and leaves[0].dim() == 0:
        return [sum(p.sum() for p in products)]
    return products
