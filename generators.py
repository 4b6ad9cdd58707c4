"""Repetition-override generators: where each repetition of a fan-out starts.

A generator turns ``repetitions`` (and a seed) into one override mapping per
repetition, e.g. ``{"network_weight.lr": -3.2, "network_weight.momentum": 0.4,
"seed": 7}``. The same overrides are given to every algorithm, so all
algorithms start from the same points -- the comparison the paper makes -- and
the same seed gives the same initialisations on every machine.

Generators are registered by name and chosen on the command line
(``--generator natural_sgd``, ``--generator from_directory:inits``) or in a
campaign YAML (``generator: {class: natural_sgd, lr: [-5, -1]}``); adding one
needs no change to ``parallel_exec.py``::

    @GENERATORS.register("my_generator")
    def my_generator(repetitions, seed, scale=1.0):
        return [{"network_weight.lr": -scale * k} for k in range(repetitions)]
"""
import math
from pathlib import Path

import numpy as np

import config as config_module
from errors import UserError
from registry import Registry

GENERATORS = Registry("generator")


class Overrides(dict):
    """One repetition's overrides; ``source`` names the file they came from
    (``from_directory``), so a bad key in it is blamed on that file."""

    def __init__(self, values, source=None):
        super().__init__(values)
        self.source = source


def logit(probability):
    """Inverse of the sigmoid: momentum is stored through it (``momentum: sigmoid``)."""
    probability = min(max(probability, 1e-12), 1 - 1e-12)
    return math.log(probability / (1 - probability))


def _check_interval(name, interval, lowest=-math.inf, highest=math.inf):
    if (not isinstance(interval, (list, tuple)) or len(interval) != 2
            or not all(isinstance(v, (int, float)) for v in interval)
            or not lowest <= interval[0] <= interval[1] <= highest):
        raise ValueError(f"{name} must be [low, high] with {lowest} <= low <= high <= {highest}, "
                         f"got {interval!r}")


@GENERATORS.register("natural_sgd")
def natural_sgd(repetitions, seed, lr=(-6.0, -1.0), weight_decay=(-7.0, -2.0), momentum=(0.0, 1.0)):
    """The paper's random SGD initialisations: lr = 10^U(lr), weight decay =
    10^U(weight_decay), momentum = U(momentum), each stored in the space the
    configs use (log10 for lr and weight decay, inverse sigmoid for momentum)."""
    _check_interval("lr", lr)
    _check_interval("weight_decay", weight_decay)
    _check_interval("momentum", momentum, 0.0, 1.0)
    generator = np.random.default_rng(seed)
    overrides = []
    for repetition in range(repetitions):
        overrides.append({
            "network_weight.lr": float(generator.uniform(*lr)),
            "network_weight.weight_decay": float(generator.uniform(*weight_decay)),
            "network_weight.momentum": logit(float(generator.uniform(*momentum))),
            "seed": seed + repetition,
        })
    return overrides


@GENERATORS.register("iteration_id")
def iteration_id(repetitions, seed):
    """Only the seed changes: repetition k uses seed ``seed + k``, every other
    setting comes from the config files (for fixed-hyperparameter baselines)."""
    return [{"seed": seed + repetition} for repetition in range(repetitions)]


def flatten(mapping, prefix=""):
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``class`` keys stay as ``a.class``."""
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


@GENERATORS.register("from_directory")
def from_directory(repetitions, seed, directory):
    """One override file per repetition, taken in sorted order from
    ``directory/*.yaml`` (the paper's ``inits/`` files with ``config_dicts``
    work unchanged). ``repetitions`` None means all files."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"directory '{directory}' not found")
    files = sorted(list(folder.glob("*.yaml")) + list(folder.glob("*.yml")))
    if not files:
        raise ValueError(f"directory '{directory}' holds no *.yaml override files")
    if repetitions is None:
        repetitions = len(files)
    if repetitions > len(files):
        raise ValueError(f"{repetitions} repetitions asked but '{directory}' holds only "
                         f"{len(files)} override files")
    overrides = []
    for path in files[:repetitions]:
        data = config_module.read_yaml(path, "override file")
        overrides.append(Overrides(flatten(data), source=str(path)))
    return overrides


def parse_spec(text):
    """Command-line form -> spec: ``natural_sgd`` or ``from_directory:DIR``."""
    if isinstance(text, dict):
        return dict(text)
    name, _, argument = str(text).partition(":")
    if name == "from_directory":
        if not argument:
            raise UserError("--generator from_directory needs a directory: from_directory:DIR")
        return {"class": name, "directory": argument}
    if argument:
        raise UserError(f"--generator {text}: only from_directory takes an argument after ':'")
    return {"class": name}


def generate(spec, repetitions, seed=0, where="generator"):
    """The list of per-repetition override dicts for a generator spec
    (``where`` names the flag or file that chose it, for messages)."""
    spec = parse_spec(spec)
    if repetitions is not None and (not isinstance(repetitions, int) or repetitions < 1):
        raise UserError(f"--repetitions must be an integer >= 1, got {repetitions!r}")
    if repetitions is None and spec.get("class") != "from_directory":
        raise UserError("--repetitions is required for generator "
                        f"'{spec.get('class')}' (only from_directory can count its files)")
    overrides = GENERATORS.build(spec, where=where, repetitions=repetitions, seed=seed)
    return [Overrides(override, getattr(override, "source", None)) for override in overrides]
