"""Stacked YAML configuration: load, merge, override, check.

A run is described by several YAML files given in order (a dataset/model file,
then an algorithm file, ...) plus ``--set key.sub=value`` overrides. Later
sources win; nested mappings merge key by key. Every top-level key is checked
against :data:`SCHEMA` for existence and type, and an unknown key is reported
with the file it came from and the closest valid name::

    error: configs/Ours_LR.yaml: unknown key 'hyperparameter_step' (did you mean 'hyperparameter_steps'?)

Sections that name a class (``model``, ``dataset``, ``network_weight`` ...) are
checked later, against the signature of the registered constructor.

The paper's own files nest most keys under ``config_dicts``; such files are
accepted and flattened, so its initialisation files (``inits/*.yaml``) work
unchanged as overrides.
"""
import copy
import math
import re
from pathlib import Path

import yaml

from errors import UserError
from registry import closest

COMMAND_LINE = "--set"
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _section(value):
    return isinstance(value, dict)


def _string_list(value):
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _optional(check):
    return lambda value: value is None or check(value)


# key -> (check, description of the expected type, default)
SCHEMA = {
    "algorithm": (lambda v: isinstance(v, str), "a name", "Random"),
    "model": (_section, "a mapping with 'class'", None),
    "loss": (_section, "a mapping with 'class'", None),
    "dataset": (_section, "a mapping with 'class'", None),
    "network_weight": (_section, "a mapping with 'class'", {"class": "SGD"}),
    "hyperparameter": (_section, "a mapping with 'class'", {"class": "Adam", "lr": 0.05}),
    "hypergradient": (_section, "a mapping with 'class'", {"class": "None"}),
    "teaching": (_section, "a mapping with 'class'", None),
    "optimised_hyperparameters": (_string_list, "a list of names", []),
    "high_dimensional_hyperparameters": (_string_list, "a list of names", []),
    "transformed_hyperparameters": (_section, "a mapping name -> transform", {}),
    "hyperparameter_clipping": (_section, "a mapping name -> [min, max]", {}),
    "network_weight_steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1", 10),
    "hyperparameter_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0", 100),
    "batch_size": (lambda v: v == "full" or (_integer(v) and v >= 1),
                   "an integer >= 1 or full (the whole split)", 100),
    "validation_proportion": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", 0.2),
    "force_single_network_weight_step": (lambda v: isinstance(v, bool), "true or false", False),
    "reset_model_after_hyperparameter_update": (lambda v: isinstance(v, bool), "true or false", False),
    "fold_validation_into_training": (lambda v: isinstance(v, bool), "true or false", False),
    "validation_evaluation": (lambda v: v in ("minibatch", "full", "end"),
                              "one of minibatch, full, end", "minibatch"),
    "evaluation_batch_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1", 4096),
    "log_interval": (lambda v: _integer(v) and v >= 1, "an integer >= 1 (weight steps)", 100),
    "checkpoint_every": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: never)", 0),
    "divergence_penalty": (lambda v: _number(v), "a finite number", 1.0e10),
    "seed": (lambda v: _integer(v) and 0 <= v < 2 ** 62, "an integer in [0, 2**62)", 0),
    "device": (_optional(lambda v: isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v)),
               "cpu, cuda or cuda:N", None),
    "dtype": (lambda v: v in ("float32", "float64"), "float32 or float64", "float32"),
    "compile": (lambda v: isinstance(v, bool), "true or false", False),
    "flush_denormal": (lambda v: isinstance(v, bool), "true or false", True),
    "data_root": (_optional(lambda v: isinstance(v, str)), "a directory", None),
}

# Sections present only when a config gives them.
OPTIONAL_SECTIONS = ("model", "loss", "dataset", "teaching")

TRANSFORMS = ("10^", "exp", "sigmoid", None)


def defaults():
    return {key: copy.deepcopy(default) for key, (_, _, default) in SCHEMA.items()
            if key not in OPTIONAL_SECTIONS}


class Config(dict):
    """A merged configuration that remembers which source set each key.

    ``origin('network_weight.lr')`` returns the file (or ``--set``) that last
    set that key, so messages can name it; ``where('model')`` formats
    ``"<file>: model"`` for the registries.
    """

    def __init__(self, data=None, origins=None):
        super().__init__(data or {})
        self.origins = dict(origins or {})

    def origin(self, dotted_key):
        parts = dotted_key.split(".")
        for end in range(len(parts), 0, -1):
            source = self.origins.get(".".join(parts[:end]))
            if source:
                return source
        return "defaults"

    def where(self, dotted_key):
        return Location(self, dotted_key)


class Location(str):
    """``"<file>: <dotted key>"``, the place a message names, that can name a
    key below it: ``where.child('layer_size')`` blames the file that set
    ``model.layer_size`` (a typo in ``my.yaml``), not the one that created
    ``model`` (``configs/digits.yaml``)."""

    def __new__(cls, config, dotted_key):
        location = super().__new__(cls, f"{config.origin(dotted_key)}: {dotted_key}")
        location.config, location.dotted_key = config, dotted_key
        return location

    def child(self, key):
        return Location(self.config, f"{self.dotted_key}.{key}")


def differing_key(reference, other, prefix=""):
    """The first dotted key whose value differs between two mappings."""
    for key in sorted(set(reference) | set(other), key=str):
        a, b = reference.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = differing_key(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def locate(config, message):
    """Prefix the source of the key a message starts with (``teaching.steps: ...``
    -> ``my.yaml: teaching.steps: ...``), for checks deep inside that only
    know the key."""
    key = message.split(":", 1)[0].strip()
    if " " in key or key.split(".")[0] not in SCHEMA:
        return message
    return f"{config.origin(key)}: {message}"


def read_text(path, what="config file"):
    """A text file's contents; a one-line :class:`UserError` for a missing,
    unreadable, binary or non-UTF-8 file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read the {what} ({error.strerror})") from None
    if b"\0" in raw:
        raise UserError(f"{path}: a binary file, not a YAML {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save the {what} as UTF-8") from None


def read_yaml(path, what="config file"):
    """One YAML file as a mapping; a one-line :class:`UserError` otherwise."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{place}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: must contain a mapping of keys, got {type(data).__name__}")
    return flatten_legacy(data, path)


def flatten_legacy(data, source=COMMAND_LINE):
    """Accept the paper's layout: keys under ``config_dicts`` move to the top."""
    if "config_dicts" not in data:
        return data
    nested = data.pop("config_dicts") or {}
    if not isinstance(nested, dict):
        raise UserError(f"{source}: config_dicts: must be a mapping of keys, got {nested!r}")
    return deep_merge(nested, data)


def deep_merge(base, update, origins=None, source=None, prefix=""):
    """``base`` updated by ``update``: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, origins, source, f"{dotted}.")
            if origins is not None:
                origins.setdefault(dotted, source)  # the first file that made the section
            continue
        merged[key] = copy.deepcopy(value)
        if origins is not None:
            for stale in [k for k in origins if k.startswith(f"{dotted}.")]:
                del origins[stale]
            origins[dotted] = source
    return merged


def parse_override(text):
    """``'a.b=1e-3'`` -> ``('a.b', 0.001)``; the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise UserError(f"{COMMAND_LINE} {text}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"{COMMAND_LINE} {text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"{COMMAND_LINE} {text}: value is not valid YAML") from None
    if isinstance(value, str) and FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return key, value


def nest(dotted_key, value):
    result = value
    for part in reversed(dotted_key.split(".")):
        result = {part: result}
    return result


def load(sources, overrides=None):
    """Merge config files (paths or mappings) and overrides into a checked :class:`Config`.

    ``overrides`` is a mapping of dotted keys to values, or a list of
    ``key=value`` strings as given to ``--set``.
    """
    if isinstance(sources, (str, Path, dict)):
        sources = [sources]
    origins = {}
    merged = {}
    for source in sources:
        if isinstance(source, dict):
            data, name = flatten_legacy(copy.deepcopy(source), "config"), "config"
        else:
            data, name = read_yaml(source), str(source)
            if not data:
                raise UserError(f"{name}: empty config file (no keys)")
        check_top_level(data, name)
        merged = deep_merge(merged, data, origins, name)
    for key, value, name in with_sources(normalise_overrides(overrides)):
        data = flatten_legacy(nest(key, value), name)
        check_top_level(data, name)
        merged = deep_merge(merged, data, origins, name)
    config = Config(deep_merge(defaults(), merged), origins)
    check(config)
    return config


def normalise_overrides(overrides):
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    return [parse_override(text) if isinstance(text, str) else text for text in overrides]


def with_sources(overrides):
    """``(key, value, source)`` for each override: pairs come from ``--set``;
    a third item names another source (a flag, an override file)."""
    return [tuple(item) if len(item) == 3 else (*item, COMMAND_LINE) for item in overrides]


def check_top_level(data, source):
    for key in data:
        if not isinstance(key, str):
            raise UserError(f"{source}: keys must be names, got {key!r}")
        if key not in SCHEMA:
            raise UserError(f"{source}: unknown key '{key}'{closest(key, SCHEMA)}")


def check(config):
    """Types and ranges of top-level keys, and cross-key consistency."""
    for key, (is_valid, expected, _) in SCHEMA.items():
        if key in config and not is_valid(config[key]):
            raise UserError(f"{config.where(key)}: must be {expected}, got {config[key]!r}")
    if "teaching" not in config:
        for key in ("model", "loss", "dataset"):
            if key not in config:
                files = ", ".join(dict.fromkeys(config.origins.values())) or "the configs"
                raise UserError(f"{files}: {key}: missing section (give a dataset config such as "
                                f"configs/digits.yaml before the algorithm config)")
    for name in config["high_dimensional_hyperparameters"]:
        if name not in config["optimised_hyperparameters"]:
            raise UserError(f"{config.where('high_dimensional_hyperparameters')}: '{name}' must "
                            f"also be in optimised_hyperparameters")
    for name, transform in config["transformed_hyperparameters"].items():
        if transform not in TRANSFORMS:
            raise UserError(f"{config.where('transformed_hyperparameters.' + name)}: unknown "
                            f"transform {transform!r}; valid: 10^, exp, sigmoid, null")
    for name, bounds in config["hyperparameter_clipping"].items():
        if (not isinstance(bounds, list) or len(bounds) != 2 or not all(map(_number, bounds))
                or bounds[0] > bounds[1]):
            raise UserError(f"{config.where('hyperparameter_clipping.' + name)}: must be "
                            f"[min, max] with min <= max, got {bounds!r}")


def to_yaml(config):
    return yaml.safe_dump(dict(config), sort_keys=False)
