"""Name -> constructor registries for everything a config can name.

Configs never import or ``eval`` anything: a section such as
``model: {class: MLP, layer_sizes: [8, 50, 1]}`` is resolved by looking
``MLP`` up in :data:`models.MODELS`, and its options are checked against the
constructor's signature before it is called, so an unknown option is reported
by name together with the valid ones and their defaults (as submitit does).

Example::

    MODELS = Registry("model")

    @MODELS.register("MLP", aliases=["MultiLayerPerceptron"])
    def mlp(layer_sizes, activation_function="ReLU"): ...

    MODELS.build({"class": "MLP", "layer_sizes": [4, 1]}, where="a.yaml: model")
"""
import difflib
import inspect

from errors import UserError


def closest(name, candidates):
    """`` (did you mean 'x'?)`` for the closest candidate, or ``''``."""
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def below(where, key):
    """The place of ``key`` inside the section at ``where``: a
    :class:`config.Location` names the file that set that very key."""
    child = getattr(where, "child", None)
    return child(key) if child else f"{where}.{key}"


def describe_parameters(function, skip=()):
    """``a, b=1, c=None`` for a constructor's user-settable options."""
    parts = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            parts.append(parameter.name)
        else:
            parts.append(f"{parameter.name}={parameter.default!r}")
    return ", ".join(parts)


class Registry:
    """A named table of constructors, filled with :meth:`register`."""

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}
        self._aliases = {}

    def register(self, name, aliases=()):
        def decorator(function):
            self._entries[name] = function
            for alias in aliases:
                self._aliases[alias] = name
            return function

        return decorator

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries or name in self._aliases

    def get(self, name, where=""):
        """The constructor registered as ``name``; a :class:`UserError` naming
        ``where`` and the closest valid name otherwise."""
        if not isinstance(name, str):
            raise UserError(f"{where}: {self.kind} class must be a name, got {name!r}")
        if name in self._aliases:
            name = self._aliases[name]
        if name not in self._entries:
            raise UserError(
                f"{where}: unknown {self.kind} class '{name}'{closest(name, self._entries)}; "
                f"valid: {', '.join(self.names())}")
        return self._entries[name]

    def check_options(self, function, options, where, injected=()):
        """Reject options the constructor does not take, and missing required ones."""
        signature = inspect.signature(function)
        parameters = signature.parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        if not takes_any:
            for key in options:
                if key not in parameters or key in injected:
                    valid = [p for p in parameters if p not in injected]
                    raise UserError(
                        f"{below(where, key)}: unknown option '{key}'{closest(key, valid)}; "
                        f"valid options: {describe_parameters(function, skip=injected)}")
        for parameter in parameters.values():
            if (parameter.default is parameter.empty
                    and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
                    and parameter.name not in options and parameter.name not in injected):
                raise UserError(f"{where}: missing option '{parameter.name}' for {self.kind} "
                                f"class; options: {describe_parameters(function, skip=injected)}")

    def build(self, spec, where, **injected):
        """Call the constructor named by ``spec['class']`` with the rest of
        ``spec`` as keyword arguments, plus ``injected`` values the caller
        supplies (data shapes, devices) that are not user options.

        A ``TypeError``/``ValueError`` raised by the constructor for a bad value
        is reported as a :class:`UserError` naming ``where``."""
        if not isinstance(spec, dict):
            raise UserError(f"{where}: must be a mapping with a 'class' key, got {spec!r}")
        if "class" not in spec:
            raise UserError(f"{where}: missing 'class'; valid: {', '.join(self.names())}")
        options = {key: value for key, value in spec.items() if key != "class"}
        function = self.get(spec["class"], below(where, "class"))
        self.check_options(function, options, where, injected=tuple(injected))
        try:
            return function(**options, **injected)
        except (TypeError, ValueError) as error:
            named = [key for key in sorted(options, key=len, reverse=True) if key in str(error)]
            place = below(where, named[0]) if named else where
            raise UserError(f"{place}: {spec['class']}: {error}") from error
