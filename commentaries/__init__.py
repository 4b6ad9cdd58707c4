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

Each method is a :class:`commentaries.loop.TeachingMethod` registered in
:data:`TEACHERS`; :func:`commentaries.loop.run` is the one loop they all run
in. Adding a method is one registered class in any module of this package
(or anywhere that is imported): every submodule is imported with the package,
and nothing else lists the methods.
"""
import importlib
import pkgutil

from registry import Registry

TEACHERS = Registry("teaching")


def build(spec, context, where="teaching"):
    """The teaching method named by ``spec['class']``, built with its options."""
    method = TEACHERS.build(spec, where, context=context)
    method.name = next(name for name in TEACHERS.names() if TEACHERS.get(name) is type(method))
    return method


def run(spec, context, where="teaching"):
    """Build the teaching method named by ``spec['class']`` and run it to the end."""
    from commentaries import loop

    return loop.run(build(spec, context, where), context)


for _module in pkgutil.iter_modules(__path__):  # registration on import: no list of methods to edit
    importlib.import_module(f"{__name__}.{_module.name}")
