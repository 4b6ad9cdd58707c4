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
from torch.optim.adam import adam as adam_update
from torch.optim.sgd import sgd as sgd_update

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


def _listed(value):
    """A per-weight value as a list (for multi-tensor kernels); a scalar as is."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _one_minus_product(a, b):
    """``1 - a ⊙ b`` for values that are scalars or per-weight lists."""
    if not isinstance(a, list) and not isinstance(b, list):
        return 1 - a * b
    count = len(a) if isinstance(a, list) else len(b)
    return [1 - per_weight(a, i) * per_weight(b, i) for i in range(count)]


def _total(tensors):
    """The sum of all elements of a list of tensors, in two kernels."""
    return torch.cat([t.reshape(-1) for t in tensors]).sum()


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

    def linearisation(weights, grads, state, hypers, new_state=None):
        """Products with the Jacobians of one update ``u`` at ``weights``
        (``state`` is the state *before* the update, ``new_state`` the one
        after, if already computed), for implicit hypergradients. With ``H``
        the Hessian of the training loss::

            v ∂u/∂w   = (1 - lr ⊙ weight_decay) ⊙ v - H (lr ⊙ v)
            p ∂u/∂lr  = -p ⊙ b_new          (summed for a scalar lr)
            p ∂u/∂wd  = -p ⊙ lr ⊙ w
            p ∂u/∂mom = -p ⊙ lr ⊙ b_old

        ``H x`` costs one double-backward through ``grads`` alone, cheaper
        than through the whole update; everything else is a few multi-tensor
        kernels instead of a backward pass."""
        with torch.no_grad():
            lr, weight_decay, momentum = (_listed(hypers[name])
                                          for name in ("lr", "weight_decay", "momentum"))
            old_buffers = state["momentum_buffer"]
            if new_state is None:
                new_buffers = torch._foreach_mul(old_buffers, momentum)
                torch._foreach_add_(new_buffers, grads)
                torch._foreach_add_(new_buffers, torch._foreach_mul(weights, weight_decay))
            else:
                new_buffers = new_state["momentum_buffer"]
            keep = _one_minus_product(lr, weight_decay)

        def weight_product(vector, hessian_product):
            curvature = hessian_product(torch._foreach_mul(vector, lr))
            product = torch._foreach_mul(vector, keep)
            torch._foreach_sub_(product, curvature)
            return tuple(product)

        def hyperparameter_products(vector, names):
            """``{name: p ∂u/∂name}`` for the requested names: one tensor
            per weight for a per-weight hyperparameter, else a 0-d tensor."""
            factors = {"lr": lambda: new_buffers,
                       "weight_decay": lambda: torch._foreach_mul(weights, lr),
                       "momentum": lambda: torch._foreach_mul(old_buffers, lr)}
            products = {}
            for name in names:
                elementwise = torch._foreach_mul(vector, factors[name]())
                torch._foreach_neg_(elementwise)
                products[name] = (tuple(elementwise) if isinstance(hypers[name], (tuple, list))
                                  else _total(elementwise))
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


def _fusable(tensors):
    return all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)


@HYPERPARAMETER_OPTIMISERS.register("Adam")
class HyperAdam:
    """The paper's default outer optimiser (lr 0.05): Adam on the raw
    hyperparameter leaves, ``step(grads)`` updating them in place.

    The update is ``torch.optim.Adam``'s own (its functional kernel, fused
    where the device allows), called directly: on a handful of scalars the
    ``Optimizer`` wrapper and ``.grad`` bookkeeping cost several times the
    update itself, and this runs once per hyperparameter step.
    """

    def __init__(self, params, lr=0.05, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = float(lr), map(float, betas), float(eps)
        self.fused = _fusable(self.params)
        step_dtype = torch.float32 if self.fused else torch.get_default_dtype()
        self.state = {
            "exp_avg": [torch.zeros_like(p) for p in self.params],
            "exp_avg_sq": [torch.zeros_like(p) for p in self.params],
            "step": [torch.zeros((), dtype=step_dtype, device=p.device) for p in self.params]}

    @torch.no_grad()
    def step(self, grads):
        if torch.compiler.is_compiling():
            return self._traced_step(grads)
        adam_update(
            self.params, list(grads), self.state["exp_avg"], self.state["exp_avg_sq"], [],
            self.state["step"], fused=self.fused, foreach=False if self.fused else None,
            amsgrad=False, beta1=self.beta1, beta2=self.beta2, lr=self.lr, weight_decay=0.0,
            eps=self.eps, maximize=False)

    def _traced_step(self, grads):
        """The same update written out for a compiled hyperparameter step
        (:mod:`compiled`), where the compiler fuses it: the step count stays
        a tensor (no host sync) and, as in the fused kernel, the bias
        corrections are taken in double precision (a float32 ``0.999 ** t``
        would be off by 1e-4 relative at t = 1)."""
        for param, grad, average, square, step in zip(
                self.params, grads, self.state["exp_avg"], self.state["exp_avg_sq"],
                self.state["step"]):
            step.add_(1)
            count = step.to(torch.float64)
            step_size = (self.lr / (1 - self.beta1 ** count)).to(param.dtype)
            root_correction = (1 - self.beta2 ** count).sqrt().to(param.dtype)
            average.lerp_(grad, 1 - self.beta1)
            square.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            param.sub_(step_size * average / (square.sqrt() / root_correction + self.eps))

    def state_dict(self):
        return {key: [t.clone() for t in tensors] for key, tensors in self.state.items()}

    @torch.no_grad()
    def load_state_dict(self, state):
        for key, tensors in self.state.items():
            for tensor, saved in zip(tensors, state[key]):
                tensor.copy_(saved)


@HYPERPARAMETER_OPTIMISERS.register("SGD")
class HyperSGD:
    """Baydin et al.'s outer optimiser: SGD (optionally with momentum) on the
    raw hyperparameter leaves, ``torch.optim.SGD``'s functional update."""

    def __init__(self, params, lr=0.001, momentum=0.0):
        self.params = list(params)
        self.lr, self.momentum = float(lr), float(momentum)
        # Zero buffers from the start (torch.optim starts from a copy of the
        # first gradient: the same numbers, since 0·momentum + g = g), updated
        # in place, so the state's tensors never change identity.
        self.momentum_buffers = ([torch.zeros_like(p) for p in self.params] if self.momentum
                                 else [None] * len(self.params))

    @torch.no_grad()
    def step(self, grads):
        sgd_update(self.params, list(grads), self.momentum_buffers, foreach=False,
                   weight_decay=0.0, momentum=self.momentum, lr=self.lr, dampening=0.0,
                   nesterov=False, maximize=False)

    def state_dict(self):
        return {"momentum_buffers": [None if b is None else b.clone()
                                     for b in self.momentum_buffers]}

    @torch.no_grad()
    def load_state_dict(self, state):
        for buffer, saved in zip(self.momentum_buffers, state["momentum_buffers"]):
            if buffer is None:
                continue
            if saved is None:  # a checkpoint written before the buffers were zeros
                buffer.zero_()
            else:
                buffer.copy_(saved)
