"""Differentiable weight optimisers as pairs of pure functions.

An optimiser is ``init(params) -> state`` and
``update(params, grads, state, hyperparameters) -> (params, state)`` over
tuples of tensors, in the style of optax. Hyperparameters are ordinary
inputs, so when they are tensors that require grad, the new weights are a
differentiable function of them (and of the old weights): that is all the
hypergradient methods need. Nothing is updated in place, which also keeps
``update`` usable under ``torch.func.vmap`` over independent runs.

A hyperparameter value is either one scalar tensor shared by all weights or,
for *high-dimensional* hyperparameters, a tuple with one tensor per weight
tensor, of the same shape (one learning rate per weight).

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
    # recorded update by autograd, which gives the same numbers more slowly.
    linearisation: Callable = None


def per_weight(value, index):
    """The value of a hyperparameter for weight tensor ``index``."""
    return value[index] if isinstance(value, (tuple, list)) else value


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
        if not torch.is_grad_enabled() and not any(
                isinstance(hypers[name], (tuple, list)) for name in ("lr", "weight_decay", "momentum")):
            return update_without_graph(params, grads, state, hypers)
        new_params, new_buffers = [], []
        for index, (weight, grad, buffer) in enumerate(
                zip(params, grads, state["momentum_buffer"])):
            direction = grad + per_weight(hypers["weight_decay"], index) * weight
            buffer = per_weight(hypers["momentum"], index) * buffer + direction
            new_params.append(weight - per_weight(hypers["lr"], index) * buffer)
            new_buffers.append(buffer)
        return tuple(new_params), {"momentum_buffer": tuple(new_buffers)}

    def update_without_graph(params, grads, state, hypers):
        """The same rule in six multi-tensor kernels, for the steps that need no graph."""
        direction = torch._foreach_mul(params, hypers["weight_decay"])
        torch._foreach_add_(direction, grads)
        buffers = torch._foreach_mul(state["momentum_buffer"], hypers["momentum"])
        torch._foreach_add_(buffers, direction)
        steps = torch._foreach_mul(buffers, hypers["lr"])
        return tuple(torch._foreach_sub(params, steps)), {"momentum_buffer": tuple(buffers)}

    def linearisation(weights, grads, state, hypers):
        """Products with the Jacobians of one update ``u`` at ``weights``
        (``state`` is the state *before* the update), for implicit
        hypergradients. With ``H`` the Hessian of the training loss::

            v ∂u/∂w   = v - H (lr ⊙ v) - lr ⊙ weight_decay ⊙ v
            p ∂u/∂lr  = -p ⊙ b_new          (summed for a scalar lr)
            p ∂u/∂wd  = -p ⊙ lr ⊙ w
            p ∂u/∂mom = -p ⊙ lr ⊙ b_old

        ``H x`` costs one double-backward through ``grads`` alone, cheaper
        than through the whole update; the hyperparameter products cost a
        few dot products instead of a backward pass."""
        names = ("lr", "weight_decay", "momentum")
        with torch.no_grad():
            natural = {name: hypers[name] for name in names}
            old_buffers = state["momentum_buffer"]
            new_buffers = tuple(
                per_weight(natural["momentum"], i) * b + g + per_weight(natural["weight_decay"], i) * w
                for i, (w, g, b) in enumerate(zip(weights, grads, old_buffers)))

        def weight_product(vector, hessian_product):
            scaled = tuple(per_weight(natural["lr"], i) * v for i, v in enumerate(vector))
            curvature = hessian_product(scaled)
            return tuple(v - c - per_weight(natural["weight_decay"], i) * s
                         for i, (v, c, s) in enumerate(zip(vector, curvature, scaled)))

        def hyperparameter_products(vector):
            factors = {
                "lr": new_buffers,
                "weight_decay": tuple(per_weight(natural["lr"], i) * w
                                      for i, w in enumerate(weights)),
                "momentum": tuple(per_weight(natural["lr"], i) * b
                                  for i, b in enumerate(old_buffers)),
            }
            products = {}
            for name, factor in factors.items():
                elementwise = tuple(-v * f for v, f in zip(vector, factor))
                products[name] = (elementwise if isinstance(natural[name], (tuple, list))
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


HYPERPARAMETER_OPTIMISERS = Registry("hyperparameter optimiser")


@HYPERPARAMETER_OPTIMISERS.register("Adam")
def hyper_adam(params, lr=0.05, betas=(0.9, 0.999), eps=1e-8):
    """The paper's default outer optimiser (lr 0.05)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps)


@HYPERPARAMETER_OPTIMISERS.register("SGD")
def hyper_sgd(params, lr=0.001, momentum=0.0):
    """Baydin et al.'s outer optimiser (plain SGD on the hyperparameters)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum)
