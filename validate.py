"""Check a loaded configuration's sections before anything is built or launched.

:mod:`config` checks the top-level keys; this checks what lies below them --
each section's class and options against its registry, and the values that
would otherwise crash deep inside or be accepted silently (a negative layer
width, a ``.nan`` or overflowing hyperparameter, a negative outer learning
rate) -- without loading data. It runs in ``train.main`` and, for every run
of a fan-out or a Bayesian optimisation, before anything starts, and every
message names the file (or ``--set``) that set the very key.
"""
import inspect
import math

from errors import UserError
from registry import below, closest, describe_parameters

# Options of the model that are widths or sizes: positive integers.
SIZE_WORDS = ("size", "width", "hidden", "channels", "dim", "units")
# Natural values beyond this overflow float32 (the default dtype) to inf.
LARGEST = {"float32": 3.0e38, "float64": 1.0e307}


def check(cfg):
    """Raise a one-line :class:`UserError` for the first bad value in ``cfg``."""
    check_finite(cfg, cfg, "")
    if "teaching" in cfg:
        if cfg["compile"]:
            check_teaching_compile(cfg)
        return
    import datasets
    import hypergradients
    import linear_solvers
    import models
    from optimisers import HYPERPARAMETER_OPTIMISERS

    check_options(models.MODELS, cfg, "model", derived=("input_shape", "output_size", "in_channels",
                                                        "num_classes", "vocab_size"))
    check_sizes(cfg)
    check_options(models.LOSSES, cfg, "loss")
    check_options(datasets.DATASETS, cfg, "dataset", injected=("validation_proportion", "data_root"))
    check_options(hypergradients.METHODS, cfg, "hypergradient")
    solver = cfg["hypergradient"].get("solver")
    if solver is not None:
        linear_solvers.get_solver(solver, where=cfg.where("hypergradient.solver"))
    if cfg["optimised_hyperparameters"]:
        check_options(HYPERPARAMETER_OPTIMISERS, cfg, "hyperparameter", injected=("params",))
        check_outer_rates(cfg)
    check_network_weight(cfg)


def check_teaching_compile(cfg):
    """``compile: true`` compiles a teaching method's pure outer step; a
    method without one is refused (it was silently run eagerly before)."""
    import commentaries
    from commentaries.loop import PureTeachingMethod

    name = cfg["teaching"].get("class")
    method = commentaries.TEACHERS.get(name, cfg.where("teaching.class"))
    if not issubclass(method, PureTeachingMethod):
        raise UserError(f"{cfg.where('compile')}: true is not supported for teaching.class: {name} (its "
                        f"outer step is not a pure function of its state); use compile: false")


def check_finite(cfg, value, key):
    """No ``.nan``/``.inf`` anywhere: no option means anything with them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{cfg.where(key)}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for name, item in value.items():
            check_finite(cfg, item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite(cfg, item, key)


def check_options(registry, cfg, section, injected=(), derived=()):
    """The section's class exists and takes every option given."""
    spec = cfg[section]
    where = cfg.where(section)
    if "class" not in spec:
        raise UserError(f"{where}: missing 'class'; valid: {', '.join(registry.names())}")
    function = registry.get(spec["class"], below(where, "class"))
    parameters = inspect.signature(function).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    valid = [name for name in parameters if name not in injected]
    for key in spec:
        if key != "class" and key not in valid:
            raise UserError(f"{below(where, key)}: unknown option '{key}'{closest(key, valid)}; "
                            f"valid options: {describe_parameters(function, skip=injected)}")
    for name, parameter in parameters.items():
        if (parameter.default is parameter.empty and name not in spec and name not in injected
                and name not in derived
                and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)):
            raise UserError(f"{where}: missing option '{name}' for {spec['class']}")


def check_sizes(cfg):
    """Layer widths and sizes are positive integers (``[64, -5, 10]`` is not)."""
    for key, value in cfg["model"].items():
        if not any(word in key for word in SIZE_WORDS):
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, (list, int)) and not isinstance(value, bool):
            if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
                continue
        elif value is None or isinstance(value, (tuple, float)):
            continue
        raise UserError(f"{cfg.where('model.' + key)}: must be a positive integer or a list of "
                        f"them, got {value!r}")


def check_outer_rates(cfg):
    """The outer optimiser's learning rate is a positive number: a negative one
    climbs the validation loss."""
    lr = cfg["hyperparameter"].get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise UserError(f"{cfg.where('hyperparameter.lr')}: must be a positive number, got {lr!r}")


def check_network_weight(cfg):
    """Every initial hyperparameter is a number whose natural value (after its
    transform) is finite in the run's dtype and lies within its clipping."""
    from optimisers import OPTIMISERS

    spec = cfg["network_weight"]
    where = cfg.where("network_weight")
    optimiser = OPTIMISERS.get(spec.get("class"), below(where, "class"))()
    largest = LARGEST.get(cfg["dtype"], LARGEST["float32"])
    for key, value in spec.items():
        if key == "class":
            continue
        place = cfg.where(f"network_weight.{key}")
        if key != "lr_multiplier" and key not in optimiser.hyperparameters:
            valid = ", ".join(f"{k}={v}" for k, v in optimiser.hyperparameters.items())
            raise UserError(f"{place}: unknown hyperparameter '{key}' for {spec['class']}"
                            f"{closest(key, optimiser.hyperparameters)}; "
                            f"valid (with natural defaults): {valid}, lr_multiplier")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{place}: must be a number, got {value!r}")
        if key == "lr_multiplier":
            if value <= 0:
                raise UserError(f"{place}: must be a positive number, got {value!r}")
            continue
        transform = cfg["transformed_hyperparameters"].get(key)
        natural = natural_value(value, transform)
        if not math.isfinite(natural) or abs(natural) > largest:
            raise UserError(f"{place}: {value!r} under transform {transform} is {natural!r}, "
                            f"beyond {cfg['dtype']}")
        bounds = cfg["hyperparameter_clipping"].get(key)
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise UserError(f"{place}: {value!r} lies outside its hyperparameter_clipping "
                            f"{bounds} (from {cfg.origin('hyperparameter_clipping.' + key)})")


def natural_value(value, transform):
    """The hyperparameter's natural value, computed in float64 without overflow errors."""
    try:
        if transform == "10^":
            return 10.0 ** value
        if transform == "exp":
            return math.exp(value)
    except OverflowError:
        return math.inf
    if transform == "sigmoid":
        return 0.5
    return float(value)
