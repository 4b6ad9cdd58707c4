"""Hyperparameters as raw tensors in a transformed space, by name.

As in the paper's code, config values live in the space that is optimised:
with ``transformed_hyperparameters: {lr: 10^, momentum: sigmoid}``,
``lr: -3.0`` means a learning rate of 10^-3 and ``momentum: 0.0`` means 0.5.
The outer optimiser sees only these *raw* values, so positivity and ranges
hold by construction, and ``hyperparameter_clipping`` bounds them
(``lr: [-10, 0]`` keeps the learning rate in [1e-10, 1]).

A run's hyperparameters are a mapping ``{name: raw}``, ``raw`` a 0-d tensor
or, for a *high-dimensional* hyperparameter, a tuple of tensors shaped like
the weights (one value per weight). Everything here is a pure function of
such mappings (no in-place updates), so it runs under ``torch.func``
transforms, ``vmap`` over a population and ``torch.compile``.
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

# raw from natural, as tensor operations (for a stepped learning-rate schedule)
INVERSES = {
    "10^": torch.log10,
    "exp": torch.log,
    "sigmoid": lambda natural: torch.logit(natural.clamp(1e-12, 1 - 1e-12)),
    None: lambda natural: natural,
}


def _each(function, value):
    return tuple(function(v) for v in value) if isinstance(value, tuple) else function(value)


def initial_raw(values, *, high_dimensional, weight_shapes, device, dtype, where="network_weight"):
    """``{name: number}`` -> ``{name: raw tensor}`` (a tuple shaped like the
    weights for high-dimensional names)."""
    raw = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}.{name}: must be a number, got {value!r}")
        if name in high_dimensional:
            raw[name] = tuple(torch.full(shape, float(value), device=device, dtype=dtype)
                              for shape in weight_shapes)
        else:
            raw[name] = torch.tensor(float(value), device=device, dtype=dtype)
    return raw


def natural(raw, transforms):
    """Transformed (natural) values of every hyperparameter."""
    return {name: _each(TRANSFORMS[transforms.get(name)][0], value)
            for name, value in raw.items()}


def natural_vjp(cotangents, natural_values, transforms):
    """``{name: ∂f/∂natural}`` -> ``{name: ∂f/∂raw}`` by the chain rule through
    each transform in closed form."""
    grads = {}
    for name, cotangent in cotangents.items():
        derivative = DERIVATIVES[transforms.get(name)]
        value = natural_values[name]
        if isinstance(value, tuple):
            grads[name] = tuple(c * derivative(v) for c, v in zip(cotangent, value))
        else:
            grads[name] = cotangent * derivative(value)
    return grads


def clip(raw, clipping):
    """Raw values clamped to ``hyperparameter_clipping``'s ``[min, max]``."""
    clipped = dict(raw)
    for name, (low, high) in clipping.items():
        if name in clipped:
            clipped[name] = _each(lambda v: v.clamp(low, high), clipped[name])
    return clipped


def scale(raw, name, factor, transforms, clipping):
    """Multiply the natural value of ``name`` by ``factor`` (a stepped schedule)."""
    transform = transforms.get(name)
    forward, inverse = TRANSFORMS[transform][0], INVERSES[transform]
    return clip(dict(raw, **{name: _each(lambda v: inverse(forward(v) * factor), raw[name])}),
                clipping)


def summary(raw, transforms):
    """Natural value per name as a 0-d tensor (the mean for per-weight ones)."""
    result = {}
    for name, value in natural(raw, transforms).items():
        if isinstance(value, tuple):
            result[name] = sum(v.sum() for v in value) / sum(v.numel() for v in value)
        else:
            result[name] = value
    return result
