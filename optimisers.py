"""Differentiable optimisers as pairs of pure functions.

A weight optimiser is ``init(params) -> state`` and
``update(params, grads, state, hyperparameters) -> (params, state)`` over
tuples of tensors, in the style of optax. Hyperparameters are ordinary
inputs, so the new weights are a differentiable function of them (and of
the old weights) under ``torch.func`` transforms: that is all the
hypergradient methods need. Nothing the caller holds is updated in place
(only tensors an update has itself just made) and no
multi-tensor (``_foreach``) kernel is used, so ``update`` runs unchanged
under ``torch.func.grad``/``vjp``, ``torch.func.vmap`` over a population of
runs, and ``torch.compile`` (which fuses the per-tensor loops itself).

A hyperparameter value is either one scalar tensor shared by all weights or,
for *high-dimensional* hyperparameters, a tuple with one tensor per weight
tensor, of the same shape (one learning rate per weight).

The outer (hyperparameter) optimisers are the same kind of pair over a
mapping ``{name: raw value}``: ``init(params) -> state`` and
``update(params, grads, state) -> (params, state)``, with ``torch.optim``'s
update rules.

Example (one SGD step, as ``torch.optim.SGD(lr=0.1, momentum=0.9)``)::

    optimiser = OPTIMISERS.get("SGD")()
    state = optimiser.init(params)
    hypers = {"lr": torch.tensor(0.1), "momentum": torch.tensor(0.9),
              "weight_decay": torch.tensor(0.0)}
    params, state = optimiser.update(params, grads, state, hypers)
"""
from typing import Callable, NamedTuple

import torch

from registry import Registry

OPTIMISERS = Registry("network_weight optimiser")


class WeightOptimiser(NamedTuple):
    init: Callable
    update: Callable
    hyperparameters: dict  # name -> default natural value
    # Optional closed-form products with the update's Jacobians (see
    # :func:`sgd`); without it the implicit methods differentiate the
    # update with ``torch.func.vjp``, which gives the same numbers more slowly.
    linearisation: Callable = None


def per_weight(value, index):
    """The value of a hyperparameter for weight tensor ``index``."""
    return value[index] if isinstance(value, (tuple, list)) else value


def _is_zero(value):
    """A hyperparameter fixed at 0 as a plain number (a tensor may be optimised: never skipped)."""
    return isinstance(value, (int, float)) and value == 0


@OPTIMISERS.register("SGD")
def sgd():
    """SGD with momentum and L2 weight decay, exactly as ``torch.optim.SGD``
    (dampening 0, not Nesterov)::

        d = g + weight_decay * w
        b = momentum * b + d          (b starts at 0, so the first b is d)
        w = w - lr * b
    """

    def init(params):
        return {"momentum_buffer": tuple(torch.zeros_like(p) for p in params)}

    def update(params, grads, state, hypers):
        # The formulas above, the sums accumulated in place into the products
        # this update has just made (nothing it was given, nothing autograd
        # saved), so it stays pure and the IEEE results are the same
        # (a + b = b + a): the same operations, fewer fresh tensors, which
        # for a population's large weights cost page faults.
        new_params, new_buffers = [], []
        for index, (weight, grad, buffer) in enumerate(
                zip(params, grads, state["momentum_buffer"])):
            weight_decay = per_weight(hypers["weight_decay"], index)
            momentum = per_weight(hypers["momentum"], index)
            # a constant 0 (a plain number, as the teaching methods' inner loops
            # pass) adds no operation to the graph: the same numbers
            direction = grad if _is_zero(weight_decay) else (weight_decay * weight).add_(grad)
            buffer = direction if _is_zero(momentum) else (momentum * buffer).add_(direction)
            new_params.append(weight - per_weight(hypers["lr"], index) * buffer)
            new_buffers.append(buffer)
        return tuple(new_params), {"momentum_buffer": tuple(new_buffers)}

    def linearisation(weights, grads, state, hypers, new_state):
        """Products with the Jacobians of one update ``u`` at ``weights``
        (``state`` is the state *before* the update, ``new_state`` the one
        after), for implicit hypergradients. With ``H`` the Hessian of the
        training loss::

            v ∂u/∂w   = (1 - lr ⊙ weight_decay) ⊙ v - H (lr ⊙ v)
            p ∂u/∂lr  = -p ⊙ b_new          (summed for a scalar lr)
            p ∂u/∂wd  = -p ⊙ lr ⊙ w
            p ∂u/∂mom = -p ⊙ lr ⊙ b_old

        ``H x`` comes from the caller (one product through the training
        gradient alone, cheaper than through the whole update); the rest is
        elementwise. Plain tensor operations, so it vectorises and compiles.
        Returns ``(weight_product(v, hessian_product), hyperparameter_products(p, names))``;
        the latter gives ``{name: p ∂u/∂name}`` (a 0-d tensor, or one tensor
        per weight for a per-weight hyperparameter)."""
        lr, weight_decay = hypers["lr"], hypers["weight_decay"]
        old_buffers, new_buffers = state["momentum_buffer"], new_state["momentum_buffer"]
        count = len(weights)
        keep = [1 - per_weight(lr, i) * per_weight(weight_decay, i) for i in range(count)]

        def weight_product(vector, hessian_product):
            curvature = hessian_product(tuple(v * per_weight(lr, i) for i, v in enumerate(vector)))
            return tuple(v * keep[i] - h for i, (v, h) in enumerate(zip(vector, curvature)))

        factors = {"lr": lambda i: new_buffers[i],
                   "weight_decay": lambda i: weights[i] * per_weight(lr, i),
                   "momentum": lambda i: old_buffers[i] * per_weight(lr, i)}

        def hyperparameter_products(vector, names):
            products = {}
            for name in names:
                elementwise = tuple(-v * factors[name](i) for i, v in enumerate(vector))
                products[name] = (elementwise if isinstance(hypers[name], (tuple, list))
                                  else sum(e.sum() for e in elementwise))
            return products

        return weight_product, hyperparameter_products

    return WeightOptimiser(init, update, {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.0},
                           linearisation)


@OPTIMISERS.register("Adam")
def adam():
    """Adam with L2 weight decay, as ``torch.optim.Adam``; ``beta1``, ``beta2``,
    ``eps`` are hyperparameters like any other (so they can be optimised)::

        d = g + weight_decay * w
        m = beta1 m + (1 - beta1) d ;  v = beta2 v + (1 - beta2) d²
        w = w - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    """

    def init(params):
        return {"exp_avg": tuple(torch.zeros_like(p) for p in params),
                "exp_avg_sq": tuple(torch.zeros_like(p) for p in params),
                "step": torch.zeros((), dtype=params[0].dtype, device=params[0].device)}

    def update(params, grads, state, hypers):
        step = state["step"] + 1
        new_params, averages, squares = [], [], []
        for index, (weight, grad, average, square) in enumerate(
                zip(params, grads, state["exp_avg"], state["exp_avg_sq"])):
            beta1 = per_weight(hypers["beta1"], index)
            beta2 = per_weight(hypers["beta2"], index)
            direction = grad + per_weight(hypers["weight_decay"], index) * weight
            average = beta1 * average + (1 - beta1) * direction
            square = beta2 * square + (1 - beta2) * direction * direction
            corrected_average = average / (1 - beta1 ** step)
            corrected_root = (square / (1 - beta2 ** step)).sqrt()
            new_params.append(weight - per_weight(hypers["lr"], index) * corrected_average
                              / (corrected_root + per_weight(hypers["eps"], index)))
            averages.append(average)
            squares.append(square)
        return tuple(new_params), {"exp_avg": tuple(averages), "exp_avg_sq": tuple(squares),
                                   "step": step}

    return WeightOptimiser(init, update, {"lr": 0.001, "weight_decay": 0.0, "beta1": 0.9,
                                          "beta2": 0.999, "eps": 1e-8})


# ------------------------------------------------------- outer optimisers

HYPERPARAMETER_OPTIMISERS = Registry("hyperparameter optimiser")


class OuterOptimiser(NamedTuple):
    """``init(params) -> state``, ``update(params, grads, state) -> (params, state)``
    over ``{name: tensor or tuple of tensors}`` (the optimised raw values)."""
    init: Callable
    update: Callable


def map_values(function, *mappings):
    """``{name: function(a[name], b[name], ...)}``, per tensor of a per-weight value."""
    result = {}
    for name, value in mappings[0].items():
        if isinstance(value, (tuple, list)):
            result[name] = tuple(function(*parts) for parts in zip(*(m[name] for m in mappings)))
        else:
            result[name] = function(*(m[name] for m in mappings))
    return result


def _first_tensor(params):
    value = next(iter(params.values()))
    return value[0] if isinstance(value, (tuple, list)) else value


@HYPERPARAMETER_OPTIMISERS.register("Adam")
def hyper_adam(lr=0.05, betas=(0.9, 0.999), eps=1e-8):
    """The paper's default outer optimiser (lr 0.05): ``torch.optim.Adam``'s
    update on the raw hyperparameters. The step count is a tensor (no host
    sync) and, as in ``torch.optim``, the bias corrections are taken in
    double precision (a float32 ``0.999 ** t`` would be off by 1e-4 relative
    at t = 1)."""
    lr, eps = float(lr), float(eps)
    beta1, beta2 = (float(b) for b in betas)

    def init(params):
        return {"step": torch.zeros((), dtype=torch.float64, device=_first_tensor(params).device),
                "exp_avg": map_values(torch.zeros_like, params),
                "exp_avg_sq": map_values(torch.zeros_like, params)}

    def update(params, grads, state):
        step = state["step"] + 1
        bias_correction1 = 1 - beta1 ** step
        root_correction = (1 - beta2 ** step).sqrt()
        averages = map_values(lambda m, g: m + (g - m) * (1 - beta1), state["exp_avg"], grads)
        squares = map_values(lambda v, g: v * beta2 + g * g * (1 - beta2),
                             state["exp_avg_sq"], grads)

        def parameter(p, m, v):
            step_size = (lr / bias_correction1).to(p.dtype)
            return p - step_size * m / (v.sqrt() / root_correction.to(p.dtype) + eps)

        return (map_values(parameter, params, averages, squares),
                {"step": step, "exp_avg": averages, "exp_avg_sq": squares})

    return OuterOptimiser(init, update)


@HYPERPARAMETER_OPTIMISERS.register("SGD")
def hyper_sgd(lr=0.001, momentum=0.0):
    """Baydin et al.'s outer optimiser: ``torch.optim.SGD``'s update
    (optionally with momentum) on the raw hyperparameters. The momentum
    buffers start at zero (torch.optim starts from a copy of the first
    gradient: the same numbers, since 0·momentum + g = g)."""
    lr, momentum = float(lr), float(momentum)

    def init(params):
        return {"momentum_buffer": map_values(torch.zeros_like, params)} if momentum else {}

    def update(params, grads, state):
        if not momentum:
            return map_values(lambda p, g: p - lr * g, params, grads), state
        buffers = map_values(lambda b, g: b * momentum + g, state["momentum_buffer"], grads)
        return (map_values(lambda p, b: p - lr * b, params, buffers),
                {"momentum_buffer": buffers})

    return OuterOptimiser(init, update)
