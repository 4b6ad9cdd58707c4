"""Learning to teach on the hypergradient engine.

Every method here is a bilevel problem: a *teacher* (per-example weights,
an augmentation policy, attention masks, a generator of synthetic data, an
auxiliary-loss weighting) is trained by the hypergradient of a student's
validation loss, through unrolled differentiation (Raghu et al.'s Algorithm 1)
or the implicit function theorem with a truncated Neumann series
(Algorithm 2). ``train.py`` runs them when a config has a ``teaching`` section::

    teaching:
      class: ExampleWeighting     # a name in TEACHERS
      ...                         # that method's options

Each registered constructor takes its options plus ``context`` (run
directory, TensorBoard writer, device, seed, progress flag) and returns the
run's results dictionary (``status``, ``final`` metrics, ``objective``).
"""
import importlib

from registry import Registry

TEACHERS = Registry("teaching")

# Fixed list, not read from configs: configs name registry entries only.
_METHOD_MODULES = ("example_weighting", "augmentation", "attention", "storage", "gtn",
                   "auxilearn")


def _import_methods():
    for module in _METHOD_MODULES:  # imported late: they import TEACHERS from here
        importlib.import_module(f"commentaries.{module}")


def run(spec, context, where="teaching"):
    """Build the teaching method named by ``spec['class']`` and run it."""
    _import_methods()
    return TEACHERS.build(spec, where, context=context)
