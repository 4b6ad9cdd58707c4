"""Hyperparameters as differentiable tensors in a transformed space.

As in the paper's code, config values live in the space that is optimised:
with ``transformed_hyperparameters: {lr: 10^, momentum: sigmoid}``,
``lr: -3.0`` means a learning rate of 10^-3 and ``momentum: 0.0`` means 0.5.
The outer optimiser sees only these *raw* values, so positivity and ranges
hold by construction, and ``hyperparameter_clipping`` bounds them
(``lr: [-10, 0]`` keeps the learning rate in [1e-10, 1]).

A *high-dimensional* hyperparameter has one raw value per weight (a tuple of
tensors shaped like the weights), initialised to the configured scalar.
"""
import math

import torch

from errors import UserError

TRANSFORMS = {
    "10^": (lambda raw: torch.pow(10.0, raw), lambda value: math.log10(value)),
    "exp": (torch.exp, math.log),
    "sigmoid": (torch.sigmoid, lambda value: math.log(value / (1 - value))),
    None: (lambda raw: raw, lambda value: value),
}

# d natural / d raw, written in terms of the natural value (as autograd's own
# backward formulas for pow, exp and sigmoid are).
DERIVATIVES = {
    "10^": lambda natural: natural * math.log(10.0),
    "exp": lambda natural: natural,
    "sigmoid": lambda natural: natural * (1 - natural),
    None: torch.ones_like,
}


class Hyperparameters:
    """Raw hyperparameter tensors, their transforms, and which are optimised."""

    def __init__(self, initial, *, transforms, clipping, optimised, high_dimensional,
                 weight_shapes, device, dtype, where="network_weight"):
        self.names = list(initial)
        self.transforms = {name: transforms.get(name) for name in self.names}
        self.clipping = dict(clipping)
        self.optimised = [name for name in self.names if name in optimised]
        self.high_dimensional = set(high_dimensional)
        self.raw = {}
        for name, value in initial.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}.{name}: must be a number, got {value!r}")
            requires_grad = name in self.optimised
            if name in self.high_dimensional:
                self.raw[name] = tuple(
                    torch.full(shape, float(value), device=device, dtype=dtype,
                               requires_grad=requires_grad) for shape in weight_shapes)
            else:
                self.raw[name] = torch.tensor(float(value), device=device, dtype=dtype,
                                              requires_grad=requires_grad)
        self.clip_()

    def leaves(self):
        """The optimised raw tensors, in a fixed order (for the outer optimiser)."""
        tensors = []
        for name in self.optimised:
            value = self.raw[name]
            tensors.extend(value if isinstance(value, tuple) else [value])
        return tensors

    def natural(self):
        """Transformed values, still connected to the raw tensors' graph."""
        result = {}
        for name, value in self.raw.items():
            forward, _ = TRANSFORMS[self.transforms[name]]
            result[name] = (tuple(forward(v) for v in value) if isinstance(value, tuple)
                            else forward(value))
        return result

    def natural_detached(self):
        with torch.no_grad():
            return self.natural()

    @torch.no_grad()
    def natural_vjp(self, cotangents, natural):
        """Gradients of the optimised raw leaves (in :meth:`leaves` order)
        from ``{name: ∂f/∂natural}``, by the chain rule through each transform
        in closed form: cheaper than a backward pass through ``natural()``."""
        grads = []
        for name in self.optimised:
            derivative = DERIVATIVES[self.transforms[name]]
            if isinstance(natural[name], tuple):
                grads.extend(c * derivative(v) for c, v in zip(cotangents[name], natural[name]))
            else:
                grads.append(cotangents[name] * derivative(natural[name]))
        return grads

    @torch.no_grad()
    def clip_(self):
        for name, (low, high) in self.clipping.items():
            if name not in self.raw:
                continue
            value = self.raw[name]
            for tensor in (value if isinstance(value, tuple) else (value,)):
                tensor.clamp_(low, high)

    @torch.no_grad()
    def scale_(self, name, factor):
        """Multiply the natural value of ``name`` by ``factor`` (a stepped schedule)."""
        forward, inverse = TRANSFORMS[self.transforms[name]]
        value = self.raw[name]
        for tensor in (value if isinstance(value, tuple) else (value,)):
            natural = forward(tensor) * factor
            if self.transforms[name] == "10^":
                tensor.copy_(torch.log10(natural))
            elif self.transforms[name] == "exp":
                tensor.copy_(torch.log(natural))
            elif self.transforms[name] == "sigmoid":
                tensor.copy_(torch.logit(natural.clamp(1e-12, 1 - 1e-12)))
            else:
                tensor.copy_(natural)
        self.clip_()

    def summary(self):
        """Natural value per name as a 0-d tensor (the mean for per-weight ones)."""
        result = {}
        for name, value in self.natural_detached().items():
            if isinstance(value, tuple):
                total = sum(v.sum() for v in value)
                count = sum(v.numel() for v in value)
                result[name] = total / count
            else:
                result[name] = value
        return result

    def state_dict(self):
        return {name: (tuple(v.detach().clone() for v in value) if isinstance(value, tuple)
                       else value.detach().clone()) for name, value in self.raw.items()}

    @torch.no_grad()
    def load_state_dict(self, state):
        for name, value in state.items():
            target = self.raw[name]
            if isinstance(target, tuple):
                for t, v in zip(target, value):
                    t.copy_(v)
            else:
                target.copy_(value)
