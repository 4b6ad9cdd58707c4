"""Kernel-fused steps for ``compile: true``: the engine's hot functions as
pure ``torch.func`` functions, compiled once per run with ``torch.compile``.

At the sizes of the paper's UCI and Fashion-MNIST experiments a step is
almost all per-operation overhead, which fusion removes (an MLP 8-50-1 step
on one CPU thread runs about twice as fast compiled; ``bench/RESULTS.md``).
The compiled functions:

* ``weight_step(weights, state, natural, inputs, targets)``: an ordinary
  weight update (gradient + the optimiser's pure ``update``);
* ``hyperparameter_step``: for the closed-form implicit methods with the
  Neumann solver, the whole hyperparameter update as one graph
  (:func:`fused_hyperparameter_step`);
* otherwise (``solver: cg``), its pieces: ``gradient(weights, inputs,
  targets) -> (loss, ∇L)`` for the recorded step's training gradient and the
  validation gradient, and ``hessian_product(weights, vector, inputs,
  targets) -> H v`` (reverse over reverse) for the solver
  (:func:`hypergradients.linearised`).

Compiled kernels may sum in a different order than eager ones, so a compiled
run matches an eager one to rounding, not bit for bit; a compiled run is
still reproducible and resumes bit for bit. Compilation happens in
:meth:`CompiledSteps.warm_up`, before the timed training loop, and its time
is reported separately. Models with buffers (batch norm) and the unrolled
method are not compiled.
"""
import contextlib
import copy
import functools
import logging
import time

import torch
from torch.func import functional_call, grad, grad_and_value, vjp

from errors import UserError


class CompiledSteps:
    """The compiled functions for one model, loss and weight optimiser (and,
    for a fused hyperparameter step, the hypergradient method and the
    hyperparameters' transforms)."""

    def __init__(self, problem, optimiser, where="compile", method=None, hyperparameters=None,
                 apply_hypergradients=None, stateful=()):
        if problem.buffers:
            raise UserError(f"{where}: true is not supported for models with buffers "
                            f"({', '.join(problem.buffers)}); use compile: false")
        model, loss_function, names = problem.model, problem.loss_function, problem.names

        def loss(weights, inputs, targets):
            return loss_function(functional_call(model, dict(zip(names, weights)), (inputs,)),
                                 targets)

        def gradient(weights, inputs, targets):
            grads, value = grad_and_value(loss)(weights, inputs, targets)
            return value, grads

        def weight_step(weights, state, natural, inputs, targets):
            value, grads = gradient(weights, inputs, targets)
            with torch.no_grad():
                weights, state = optimiser.update(weights, grads, state, natural)
            return weights, state, value

        def hessian_product(weights, vector, inputs, targets):
            _, pullback = vjp(lambda w: grad(loss)(w, inputs, targets), weights)
            return pullback(vector)[0]

        # inductor looks for a CUDA toolkit even on CPU and warns when it finds none
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # cpp_wrapper: the kernels and matrix products of a graph are called
        # from generated C++ rather than Python, which matters at these sizes
        # (the fused hyperparameter step makes about 60 such calls): it costs
        # compile time once per process and cache. Measured on CPU only, so
        # other devices keep inductor's default.
        on_cpu = problem.parameters[0].device.type == "cpu"
        compile_ = functools.partial(torch.compile, dynamic=False,
                                     options={"cpp_wrapper": True} if on_cpu else None)
        self.weight_step = compile_(weight_step)
        self.gradient = compile_(gradient)
        self.hessian_product = compile_(hessian_product)
        self.hyperparameter_step = None
        self.stateful = stateful  # what the fused step updates in place
        if fusable(method, optimiser):  # no autograd graph around it: torch.func inside
            self.hyperparameter_step = torch.no_grad()(compile_(
                fused_hyperparameter_step(loss, optimiser, method, hyperparameters,
                                          apply_hypergradients), fullgraph=True))

    @contextlib.contextmanager
    def restoring_state(self):
        """Put back, after the block, what the fused hyperparameter step
        updates in place (the hyperparameters and the outer optimiser)."""
        saved = [(owner, owner.state_dict()) for owner in self.stateful]
        try:
            yield
        finally:
            for owner, state in saved:
                owner.load_state_dict(state)

    def warm_up(self, weights, state, natural, batches, hessian=True):
        """Compile every function the run will call for the shapes of
        ``batches`` (a training and a validation batch) by calling it on
        copies; nothing in the run's state changes. Returns the seconds spent."""
        started = time.perf_counter()
        copies, copied_state = copy.deepcopy((weights, state))
        try:
            self.weight_step(copies, copied_state, natural, *batches[0])
            if hessian and self.hyperparameter_step is not None:
                with self.restoring_state():
                    self.hyperparameter_step(copies, copied_state, *batches[0], *batches[1])
            elif hessian:  # a vector distinct from the weights, as in the real calls
                for batch in batches:
                    self.gradient(copies, *batch)
                self.hessian_product(copies, tuple(w.clone() for w in weights), *batches[0])
        except torch._dynamo.exc.TorchDynamoException as error:
            cause = getattr(error, "inner_exception", None) or error
            first_line = (str(cause).splitlines() or [""])[0][:200]
            raise UserError(f"compile: torch.compile failed ({type(cause).__name__}: "
                            f"{first_line}); use compile: false") from None
        return time.perf_counter() - started


def fusable(method, optimiser):
    """Whether one hyperparameter step compiles into one graph: the
    closed-form implicit methods with the Neumann solver (conjugate
    gradients stops on a data-dependent test, which a single graph cannot
    hold, and runs on the separately compiled products instead)."""
    return (method is not None and getattr(method, "solver", None) == "neumann"
            and method.linearises(optimiser))


def fused_hyperparameter_step(loss, optimiser, method, hyperparameters, apply_hypergradients):
    """The whole hyperparameter step of a closed-form implicit method as one
    function, for :func:`torch.compile` to fuse::

        (weights, state, inputs, targets, validation_inputs, validation_targets)
            -> (w_1, state_1, L_T(w_0), summary of dL_V/d raw)

    It records ``∇L_T(w_0)`` once as a ``vjp`` and reuses that pullback for
    every Hessian-vector product of the Neumann series, so the forward and
    backward pass of the training batch run once, not once per product
    (as separately compiled products must). The maths is the engine's own,
    traced, not rewritten: :meth:`hypergradients.Implicit.closed_form_hypergradient`,
    the optimiser's ``linearisation``,
    :meth:`hyperparameters.Hyperparameters.natural_vjp`, and
    ``apply_hypergradients(grads) -> summary`` (the engine's outer optimiser
    step and clipping, which update the raw hyperparameters in place).
    :class:`CompiledSteps` calls it under ``torch.no_grad()``.
    """
    optimised = tuple(hyperparameters.optimised)

    def step(weights, state, inputs, targets, validation_inputs, validation_targets):
        natural = hyperparameters.natural()
        grads, pullback, value = vjp(
            lambda w: grad_and_value(loss)(w, inputs, targets), weights, has_aux=True)
        end, new_state = optimiser.update(weights, grads, state, natural)
        linearisation = optimiser.linearisation(weights, grads, state, natural, new_state)
        validation_grad = grad(loss)(end, validation_inputs, validation_targets)
        hypergradients, _ = method.closed_form_hypergradient(
            validation_grad, linearisation, lambda vector: pullback(vector)[0],
            lambda cotangents: hyperparameters.natural_vjp(cotangents, natural), optimised,
            training_grads=grads)
        return end, new_state, value, apply_hypergradients(hypergradients)

    return step
