"""One hyperparameter step as a pure function of a run's state.

A run's state is one mapping of tensors (a pytree)::

    {"weights": (w, ...),                 # the model's parameters, in named_parameters order
     "optimiser": {...},                  # the weight optimiser's state (optimisers.py)
     "hyperparameters": {name: raw},      # raw values, a tuple per weight for per-weight ones
     "outer": {...},                      # the outer optimiser's state ({}: nothing optimised)
     "buffers": {name: tensor},           # model buffers (batch-norm running statistics)
     "last_training_loss": 0-d tensor,
     "hyperparameter_step": 0-d int64, "weight_step": 0-d int64,  # the run's counters
     "initial_weights": ..., "initial_optimiser": ...}  # reset_model_after_hyperparameter_update

and one hyperparameter step is :meth:`Program.step`::

    (state, batches) -> (state, {"training_loss": L_T, "hypergradients": {name: Σ dL_V/d raw}})

``batches`` holds row indices (``None``: the whole split) drawn outside the
step by the run's own samplers (:class:`engine.Sampler`), one per weight
update and one for validation: ``{"training": [idx, ...], "validation": idx}``.
The data tensors themselves are closed over, shared by every run that uses
the program; the step gathers each batch's rows (one ``index_select`` for a
whole population) and hands them to its pieces. The step is written with ``torch.func`` (``grad``, ``vjp``,
``functional_call``): no in-place updates of the state, no host syncs, no
autograd graph outside it. So one implementation runs eagerly (one run),
under ``torch.compile`` (``compile: true``) and under ``torch.func.vmap``
over a population of runs whose states are stacked along a leading
dimension (``train.py --population``), alone or compiled.

A step is ``network_weight_steps - K`` plain weight updates
(:meth:`Program.weight_step`) and one :meth:`Program.hyperparameter_update`
(the method's K differentiated updates, the outer optimiser, clipping, the
``lr_multiplier`` schedule and the model reset). :meth:`Program.wrapped`
applies one transformation (``torch.compile``, ``vmap``, both) to these
two pieces, which is what compiling or vectorising the step means.
"""
import itertools

import torch
from torch.func import functional_call, grad_and_value

import hyperparameters as hp
from hypergradients import Window
from trees import tree_map


def eager_grad_and_value(loss):
    """``torch.func.grad_and_value(loss)`` for the untransformed program, by
    plain reverse mode: the same numbers, without the transform's per-call
    wrapping of every tensor, which costs more than the forward and backward
    passes of a small model (a plain eager UCI-energy step: about 3x).
    :meth:`Program.wrapped` uses ``torch.func``'s, which vmap and compile need."""
    def call(weights, batch):
        with torch.enable_grad():
            leaves = tuple(weight.detach().requires_grad_(True) for weight in weights)
            value = loss(leaves, batch)
            grads = torch.autograd.grad(value, leaves)
        return grads, value.detach()
    return call


class Program:
    """The pure functions of one run configuration: model, loss, data, weight
    optimiser, hypergradient method, outer optimiser, transforms. Holds no
    run state; :meth:`initial_state` makes one."""

    def __init__(self, *, model, loss_function, data, optimiser, method, outer, transforms,
                 clipping, optimised, network_weight_steps, lr_multiplier=None, reset=False,
                 validation_split="validation"):
        self.model, self.loss_function, self.data = model, loss_function, data
        self.names = [name for name, _ in model.named_parameters()]
        self.tied = tied_names(model)
        self.optimiser, self.method, self.outer = optimiser, method, outer
        self.transforms, self.clipping = dict(transforms), dict(clipping)
        self.optimised = tuple(optimised)
        self.recorded = method.differentiable_steps(network_weight_steps) if optimised else 0
        self.plain = network_weight_steps - self.recorded
        self.lr_multiplier, self.reset = lr_multiplier, reset
        self.validation_split = validation_split
        self.gradient = eager_grad_and_value  # :meth:`wrapped` swaps in torch.func's
        self.weight_step_function = self.weight_step
        self.hyperparameter_update_function = self.hyperparameter_update

    # ------------------------------------------------------------ the model

    def batch(self, split, indices):
        inputs = getattr(self.data, f"{split}_inputs")
        targets = getattr(self.data, f"{split}_targets")
        if indices is None:
            return inputs, targets
        # index_select: half the cost of advanced indexing for a minibatch of rows
        return inputs.index_select(0, indices), targets.index_select(0, indices)

    def rows(self, split, indices):
        """The rows ``indices`` of ``split`` as ``(inputs, targets)``, gathered
        before the step's transformed pieces run: ``indices`` of shape ``(B,)``
        for a run or ``(N, B)`` for a population give ``(B, ...)`` or
        ``(N, B, ...)``. One ``index_select`` for a whole population: under
        ``vmap`` a per-member ``index_select`` of shared data becomes a
        ``gather`` over an index expanded to every input element (Fashion-MNIST
        shape, 64 members: 6.5 ms against 1.3 ms). ``None`` (the whole split)
        stays ``None``: the pieces take the shared split themselves."""
        if indices is None:
            return None
        flat = indices.reshape(-1)
        return tuple(tensor.index_select(0, flat).reshape(indices.shape + tensor.shape[1:])
                     for tensor in (getattr(self.data, f"{split}_inputs"),
                                    getattr(self.data, f"{split}_targets")))

    def batch_of(self, split, rows):
        """A piece's batch: the gathered ``rows``, or the whole split."""
        return self.batch(split, None) if rows is None else rows

    def predict(self, weights, buffers, inputs):
        named = {**dict(zip(self.names, weights)), **buffers}
        for name, others in self.tied.items():
            named.update(dict.fromkeys(others, named[name]))
        # the ties spelt out once (tied_names), not looked up at every call:
        # that look-up was a third of an eager UCI-energy forward pass
        return functional_call(self.model, named, (inputs,), tie_weights=False)

    def loss_with(self, buffers):
        """``(weights, batch) -> training-mode loss``. The model sees copies of
        the buffers: a batch-norm layer normalises with batch statistics, and
        whatever it does to its running statistics stays out of the state
        (:meth:`updated_buffers` owns them)."""
        def loss(weights, batch):
            inputs, targets = batch
            copies = {name: value.clone() for name, value in buffers.items()}
            return self.loss_function(self.predict(weights, copies, inputs), targets)
        return loss

    def updated_buffers(self, weights, buffers, inputs):
        """The running statistics after one training-mode forward pass (a
        no-op, and no pass, for models without buffers)."""
        if not buffers:
            return buffers
        with torch.no_grad():
            copies = {name: value.clone() for name, value in buffers.items()}
            self.predict(weights, copies, inputs)
        return copies

    # ------------------------------------------------------------ the state

    def initial_state(self, weights, raw, buffers):
        """A fresh run's state from its initial weights, raw hyperparameters
        (``hyperparameters.initial_raw``) and buffers."""
        raw = hp.clip(raw, self.clipping)
        optimiser_state = self.optimiser.init(weights)
        state = {"weights": tuple(weights), "optimiser": optimiser_state,
                 "hyperparameters": raw,
                 "outer": (self.outer.init({name: raw[name] for name in self.optimised})
                           if self.optimised else {}),
                 "buffers": dict(buffers),
                 "last_training_loss": torch.full((), float("nan"), dtype=weights[0].dtype,
                                                  device=weights[0].device),
                 # counters are state too: the pure step advances them on the device
                 # (eager, compiled, vmapped alike) and the loop reads them at intervals
                 "hyperparameter_step": torch.zeros((), dtype=torch.int64, device=weights[0].device),
                 "weight_step": torch.zeros((), dtype=torch.int64, device=weights[0].device)}
        if self.reset:
            state["initial_weights"], state["initial_optimiser"] = state["weights"], optimiser_state
        return state

    # ------------------------------------------------------------ the step

    def step(self, state, batches):
        """One hyperparameter step: ``(state, batches) -> (state, metrics)``.
        The rows are gathered here, outside the transformed pieces (:meth:`rows`)."""
        training = [self.rows("training", indices) for indices in batches["training"]]
        validation = self.rows(self.validation_split, batches["validation"])
        for rows in training[:self.plain]:
            state = self.weight_step_function(state, rows)
        return self.hyperparameter_update_function(state, training[self.plain:], validation)

    def weight_step(self, state, rows):
        """One plain weight update on the training ``rows`` (:meth:`rows`)."""
        weights, buffers = state["weights"], state["buffers"]
        natural = hp.natural(state["hyperparameters"], self.transforms)
        batch = self.batch_of("training", rows)
        grads, loss = self.gradient(self.loss_with(buffers))(weights, batch)
        new_weights, optimiser_state = self.optimiser.update(weights, grads, state["optimiser"],
                                                             natural)
        return {**state, "weights": new_weights, "optimiser": optimiser_state,
                "buffers": self.updated_buffers(weights, buffers, batch[0]),
                "last_training_loss": loss, "weight_step": state["weight_step"] + 1}

    def hyperparameter_update(self, state, training_rows, validation_rows):
        """The method's differentiated updates and the outer optimiser's step
        (when hyperparameters are optimised), then the schedule and the reset."""
        raw, hypergradients = state["hyperparameters"], {}
        if self.recorded:
            state, raw, hypergradients = self._differentiated(state, training_rows,
                                                              validation_rows)
        if self.lr_multiplier is not None:
            raw = hp.scale(raw, "lr", self.lr_multiplier, self.transforms, self.clipping)
        state = {**state, "hyperparameters": raw,
                 "hyperparameter_step": state["hyperparameter_step"] + 1,
                 "weight_step": state["weight_step"] + self.recorded}
        if self.reset:
            state["weights"], state["optimiser"] = (state["initial_weights"],
                                                    state["initial_optimiser"])
        return state, {"training_loss": state["last_training_loss"],
                       "hypergradients": hypergradients}

    def _differentiated(self, state, training_rows, validation_rows):
        raw, buffers = state["hyperparameters"], state["buffers"]
        natural = hp.natural(raw, self.transforms)
        batches = [self.batch_of("training", rows) for rows in training_rows]
        validation = self.batch_of(self.validation_split, validation_rows)
        outcome = self.method.hypergradient(Window(
            self.loss_with(buffers), self.optimiser, state["weights"], state["optimiser"],
            natural, self.optimised, batches, validation))
        for start, (inputs, _) in zip(outcome.starts, batches):
            buffers = self.updated_buffers(start, buffers, inputs)
        buffers = self.updated_buffers(outcome.weights, buffers, validation[0])
        grads = outcome.cotangents
        if self.method.gradient_space == "raw":
            grads = hp.natural_vjp(grads, natural, self.transforms)
        moved, outer = self.outer.update({name: raw[name] for name in self.optimised}, grads,
                                         state["outer"])
        raw = hp.clip({**raw, **moved}, self.clipping)
        summary = {name: (sum(g.sum() for g in value) if isinstance(value, tuple) else value)
                   for name, value in grads.items()}
        state = {**state, "weights": outcome.weights, "optimiser": outcome.state,
                 "buffers": buffers, "outer": outer, "last_training_loss": outcome.training_loss}
        return state, raw, summary

    # ------------------------------------------------------------ transformations

    def wrapped(self, transform):
        """This program with ``transform`` (e.g. ``torch.compile``, :func:`vectorised`)
        applied to its two pieces; :meth:`step` then runs the transformed ones."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.gradient = grad_and_value  # transforms need torch.func's, not plain autograd
        clone.weight_step_function = transform(clone.weight_step)
        clone.hyperparameter_update_function = transform(clone.hyperparameter_update)
        return clone

    # ------------------------------------------------------------ evaluation

    def evaluate(self, weights, buffers, split, chunk_size, indices=None):
        """Mean loss and task metrics over a split (or some of its rows), in
        evaluation mode, as 0-d tensors: a pure function, vmappable."""
        inputs, targets = self.batch(split, indices)
        data = self.data
        was_training = self.model.training
        self.model.eval()
        try:
            total_loss, total_unnormalised, total_correct = 0.0, 0.0, 0.0
            for start in range(0, len(inputs), chunk_size):
                chunk_inputs = inputs[start:start + chunk_size]
                chunk_targets = targets[start:start + chunk_size]
                outputs = self.predict(weights, buffers, chunk_inputs)
                count = len(chunk_inputs)
                total_loss = total_loss + self.loss_function(outputs, chunk_targets) * count
                if data.task == "regression" and data.target_scale is not None:
                    error = (outputs - chunk_targets) * data.target_scale
                    total_unnormalised = total_unnormalised + (error ** 2).mean() * count
                if data.task == "classification":
                    # contiguous: a population's folded logits have the classes strided (models.FoldedLinear),
                    # and argmax over a strided short dimension is ~3x slower than the copy and argmax
                    total_correct = total_correct + (outputs.contiguous().argmax(-1) == chunk_targets).sum()
        finally:
            self.model.train(was_training)
        size = len(inputs)
        metrics = {"Loss": total_loss / size}
        if data.task == "regression" and data.target_scale is not None:
            metrics["Unnormalised_Loss"] = total_unnormalised / size
        if data.task == "classification":
            metrics["Accuracy"] = total_correct / size
        if data.task == "language_model":
            metrics["Perplexity"] = torch.exp(metrics["Loss"])
        return metrics


def tied_names(model):
    """``{name: [the other names of the same tensor]}`` over the model's
    parameters and buffers (``tie_weights`` of ``functional_call``, worked
    out once): a tied decoder and embedding get the same weight."""
    first, tied = {}, {}
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        owner = first.setdefault(id(tensor), name)
        if owner != name:
            tied.setdefault(owner, []).append(name)
    return tied


def vectorised(function):
    """``torch.func.vmap`` of ``function`` over the leading dimension of
    every tensor argument (a population's stacked states and per-member
    indices); ``None`` arguments (whole splits) are shared."""
    def call(*arguments):
        in_dims = tuple(tree_map(lambda leaf: None if leaf is None else 0, argument)
                        for argument in arguments)
        return torch.func.vmap(function, in_dims=in_dims)(*arguments)
    return call


def stack(states):
    """Member states -> one population state (leading dimension = member)."""
    return tree_map(lambda *leaves: torch.stack(leaves), *states)


def member(state, index):
    """Member ``index`` of a population state."""
    return tree_map(lambda leaf: leaf[index], state)
