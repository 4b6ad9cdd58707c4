"""Shared pieces of the learning-to-teach methods.

Option validation (``teaching.<key>: ...`` user errors); data and student
networks from the shared registries (``datasets.DATASETS``,
``models.MODELS``), so hyperparameter and teaching runs name them the same
way; the inner SGD loop of the unrolled methods (:class:`InnerSGD`, the core
optimiser's update as a step of :func:`hypergradients.unrolled`); figure
logging; a meter of peak allocated bytes for memory benches; and fresh
students trained with a frozen teacher (:class:`FrozenTeaching`,
:class:`StudentTraining`, :func:`train_students`). The hypergradients are the
core's (:mod:`hypergradients`), the loop is :mod:`commentaries.loop`.
"""
import contextlib
import dataclasses
import io
import math

import torch
import torch.nn.functional as F

import datasets
import models
import optimisers
from errors import UserError
from train import atomic_write

# ----------------------------------------------------------------------------
# Option validation


def check_int(value, key, minimum=None, maximum=None):
    """An integer option within bounds, else ``UserError('teaching.<key>: ...')``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"teaching.{key}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"teaching.{key}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise UserError(f"teaching.{key}: must be at most {maximum}, got {value}")
    return value


def check_float(value, key, minimum=None, maximum=None, strict_minimum=False):
    """A real option within bounds (ints accepted), else a ``UserError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"teaching.{key}: must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (strict_minimum and value == minimum)):
        relation = "greater than" if strict_minimum else "at least"
        raise UserError(f"teaching.{key}: must be {relation} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise UserError(f"teaching.{key}: must be at most {maximum}, got {value}")
    return float(value)


def check_choice(value, key, choices):
    if value not in choices:
        raise UserError(f"teaching.{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_bool(value, key):
    if not isinstance(value, bool):
        raise UserError(f"teaching.{key}: must be true or false, got {value!r}")
    return value


def check_list(value, key):
    if not isinstance(value, (list, tuple)):
        raise UserError(f"teaching.{key}: must be a list, got {value!r}")
    return list(value)


# ----------------------------------------------------------------------------
# Data and students: the shared registries of datasets.py and models.py


def load_data(spec, context, where="teaching.data"):
    """The ``teaching.data`` dataset (a :class:`datasets.Data`) on the run's device."""
    if spec is None:
        raise UserError(f"{where}: missing; a data file sets e.g. 'teaching: {{data: {{class: Digits, "
                        f"validation_size: 300, test_size: 400}}}}' (valid: {', '.join(datasets.DATASETS.names())})")
    data = datasets.load_data(spec, validation_proportion=getattr(context, "validation_proportion", 0.2),
                              data_root=getattr(context, "data_root", None), where=where)
    if data.task != "classification":
        raise UserError(f"{where}: the teaching methods need a classification dataset, not {data.name}")
    data = data.to(context.device)
    dtype = getattr(context, "dtype", torch.float32)
    return dataclasses.replace(data, **{field.name: getattr(data, field.name).to(dtype)
                                        for field in dataclasses.fields(data)
                                        if torch.is_tensor(getattr(data, field.name))
                                        and getattr(data, field.name).is_floating_point()})


def build_student(spec, data, where, default="CNN"):
    """A student (or teacher) network from ``{class: CNN, width: 8}`` or a
    name, with its shapes injected from ``data`` (``models.MODELS``)."""
    if spec is None:
        spec = {"class": default}
    if isinstance(spec, str):
        spec = {"class": spec}
    return models.build_model(dict(spec), data, where=where)


def reset_weights(module, rng, dtype=None, device=None):
    """Fresh weights for ``module`` (any architecture) as a dict of tensors:
    each layer's own ``reset_parameters`` under a seed drawn from ``rng``, so
    every outer step meets a new student, a run's students depend on its own
    generator alone (a population's members draw theirs as they would alone),
    and the global random stream is untouched."""
    seed = int(torch.randint(2 ** 62, (1,), generator=rng))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return {name: parameter.detach().clone().to(dtype=dtype or parameter.dtype,
                                                device=device or parameter.device)
            for name, parameter in module.named_parameters()}


def fresh_weights(module, device, dtype=torch.float32):
    """A detached copy of ``module``'s parameters that requires grad."""
    return {name: p.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
            for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------
# Losses


def soft_cross_entropy(logits, targets):
    """Per-example cross-entropy against soft (blended) label distributions."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def set_grads(tensors, grads):
    for tensor, grad in zip(tensors, grads):
        tensor.grad = grad.detach().clone()


# ----------------------------------------------------------------------------
# Memory: peak bytes allocated by a computation


class MemoryMeter:
    """The peak of live bytes that torch allocated inside :meth:`measure`,
    above what was live when it began, at operator granularity.

    This is the memory a differentiable unroll grows with (the tensors kept
    for backward, and the step's temporaries), measured on the CPU from the
    profiler's memory events (``torch.profiler``, ``profile_memory=True``):
    every allocation and free inside an operator, in time order. (Autograd's
    ``saved_tensors_hooks`` would count saved tensors alone, but
    ``torch.func.grad``/``vjp`` refuse to run under them, and
    ``tracemalloc`` cannot see torch's allocator.) On CUDA,
    ``torch.cuda.max_memory_allocated`` is the direct measure.
    """

    def __init__(self):
        self.peak = 0

    @contextlib.contextmanager
    def measure(self):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            yield self
        outermost = sorted((event for event in profiler.events() if event.cpu_parent is None),
                           key=lambda event: event.time_range.start)
        live = 0
        for event in outermost:  # an operator's usage includes its children's
            live += event.cpu_memory_usage
            self.peak = max(self.peak, live)


# ----------------------------------------------------------------------------
# Files and figures


def save_figure(figure, context, name, step=0):
    """Write ``figure`` as ``<run_dir>/<name>.png`` (atomically) and log it as a
    TensorBoard image under ``Commentary/<name>``; closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    path = context.run_dir / f"{name}.png"
    atomic_write(path, lambda temporary: temporary.write_bytes(buffer.getvalue()))
    if getattr(context, "writer", None) is not None:
        context.writer.add_figure(f"Commentary/{name}", figure, global_step=step, close=False)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------
# Training fresh students with a frozen teacher


class FrozenTeaching:
    """How a frozen teacher shapes a fresh student's training: the batch it
    sees at each step, its loss on that batch and its prediction. This
    default is plain training on random real batches; each method's
    :meth:`TeachingMethod.frozen_teaching` returns its own (weighted,
    blended, masked or generated batches)."""

    def batch(self, data, step, batch_size, generator):
        indices = torch.randint(0, len(data.training_inputs), (batch_size,), generator=generator)
        indices = indices.to(data.training_inputs.device)
        return data.training_inputs[indices], data.training_targets[indices]

    def loss(self, model, x, y, progress):
        """``progress``: the normalised training iteration in [0, 1) (a curriculum's input)."""
        return F.cross_entropy(model(x), y)

    def predict(self, model, x):
        return model(x)


SPLITS = (("training", "Training"), ("validation", "Validation"), ("test", "Test"))


class StudentTraining:
    """One fresh student trained with a :class:`FrozenTeaching`, step by step,
    so that a loop can log, checkpoint and resume it."""

    def __init__(self, model, data, teaching, *, steps, lr, batch_size, optimiser, generator):
        self.model, self.data, self.teaching, self.generator = model, data, teaching, generator
        self.steps, self.batch_size = steps, batch_size
        self.optimiser = {"Adam": torch.optim.Adam, "SGD": torch.optim.SGD}[optimiser](model.parameters(), lr=lr)

    def step(self, step):
        x, y = self.teaching.batch(self.data, step, self.batch_size, self.generator)
        loss = self.teaching.loss(self.model, x, y, step / self.steps)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, batch_size=1024):
        """Cross-entropy and accuracy on every split, as device tensors (no host sync)."""
        metrics = {}
        for split, title in SPLITS:
            x, y = getattr(self.data, f"{split}_inputs"), getattr(self.data, f"{split}_targets")
            loss_sum, correct = 0.0, 0.0
            for start in range(0, len(x), batch_size):
                logits = self.teaching.predict(self.model, x[start:start + batch_size])
                labels = y[start:start + batch_size]
                loss_sum = loss_sum + F.cross_entropy(logits, labels, reduction="sum")
                correct = correct + (logits.argmax(-1) == labels).sum()
            metrics[f"Loss/{title}"] = loss_sum / len(x)
            metrics[f"Accuracy/{title}"] = correct / len(x)
        return metrics

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.generator.set_state(state["generator"])


def train_students(specs, data, teaching, options, context, generator, prefix="Evaluation"):
    """Train a fresh student of each architecture in ``specs`` with the frozen
    ``teaching`` and return their mean final metrics (floats). Learning curves
    go to ``context.tracker`` (if any) under ``<prefix>/<Class>/`` every
    ``options['log_interval']`` steps, one host sync per interval."""
    tracker = getattr(context, "tracker", None)
    results = []
    for spec in specs:
        name = spec["class"] if isinstance(spec, dict) else str(spec)
        model = build_student(spec, data, "teaching.evaluation_students").to(context.device)
        student = StudentTraining(model, data, teaching, steps=options["steps"], lr=options["lr"],
                                  batch_size=options["batch_size"], optimiser=options["optimiser"],
                                  generator=generator)
        running = torch.zeros((), device=context.device)
        count = 0
        for step in range(options["steps"]):
            running += student.step(step)
            count += 1
            if (step + 1) % options["log_interval"] == 0 or step + 1 == options["steps"]:
                metrics = {**student.evaluate(), "Loss/Batch": running / count}
                running, count = torch.zeros_like(running), 0
                if tracker is not None:
                    for tag, value in metrics.items():
                        tracker.scalar(f"{prefix}/{name}/{tag}", value, step + 1)
                    tracker.flush()
        results.append(metrics)
    return {tag: float(sum(m[tag] for m in results) / len(results)) for tag in results[0]}


def evaluation_options(students, *, steps, lr, batch_size, log_interval, optimiser="Adam"):
    """The evaluation students (default: one CNN) and how :func:`train_students` trains them."""
    students = check_list(students or [{"class": "CNN"}], "evaluation_students")
    return students, {"steps": steps, "lr": lr, "optimiser": optimiser, "batch_size": batch_size,
                      "log_interval": max(1, min(log_interval, steps))}


def evaluation_generator(seed):
    """Reseed for the evaluation students: at a given run seed every method and
    baseline then trains them from the same initialisations and batch order,
    whatever random numbers learning its commentary consumed (paired comparisons)."""
    torch.manual_seed(seed + 7919)
    return torch.Generator().manual_seed(seed + 7919)


DIGITS = {"class": "Digits", "validation_size": 300, "test_size": 400}  # GTN's and AuxiLearn's default data


def split_pairs(data):
    """``{"train", "validation", "test"} -> (inputs, labels)`` of a :class:`datasets.Data`."""
    return {"train": (data.training_inputs, data.training_targets),
            "validation": (data.validation_inputs, data.validation_targets),
            "test": (data.test_inputs, data.test_targets)}


# ----------------------------------------------------------------------------
# The inner loop of the unrolled methods


class InnerSGD:
    """A student trained by SGD with momentum, the core weight optimiser's
    update (:func:`optimisers.sgd`: ``b ← μ b + ∇L``, ``w ← w − α b``), as
    the step ``(state, outer, k) -> (state, L)`` that
    :func:`hypergradients.unrolled` differentiates (Raghu et al.'s Algorithm
    1, GTN), and as a plain loop for evaluation.

    ``loss(weights, outer, k)``: the student's loss at inner step ``k``
    (``weights`` a dict by name, ``outer`` the teacher); it must be
    deterministic in ``k`` (batches drawn up front) for exact checkpointing.
    ``lr``: a number, or ``outer -> tensor`` (GTN learns its inner learning
    rate). The state is ``{"weights": tuple, "momentum_buffer": tuple}``.
    """

    def __init__(self, loss, names, lr, momentum=0.0):
        self.loss, self.names, self.lr, self.momentum = loss, tuple(names), lr, momentum
        self.optimiser = optimisers.OPTIMISERS.get("SGD")()

    def init(self, weights):
        """The state of a student starting from ``weights`` (a dict by name)."""
        weights = tuple(weights[name] for name in self.names)
        return {"weights": weights, **self.optimiser.init(weights)}

    def weights(self, state):
        return dict(zip(self.names, state["weights"]))

    def step(self, state, outer, k):
        def loss(weights):
            return self.loss(dict(zip(self.names, weights)), outer, k)

        grads, value = torch.func.grad_and_value(loss)(state["weights"])
        lr = self.lr(outer) if callable(self.lr) else self.lr
        weights, buffers = self.optimiser.update(
            state["weights"], grads, {"momentum_buffer": state["momentum_buffer"]},
            {"lr": lr, "momentum": self.momentum, "weight_decay": 0.0})
        return {"weights": weights, **buffers}, value

    def run(self, state, outer, steps, on_step=None):
        """The steps ``steps`` without a graph (evaluation, objectives);
        ``on_step(k, weights)`` sees the weights after each."""
        for k in steps:
            with torch.no_grad():
                state, _ = self.step(state, outer, k)
            if on_step is not None:
                on_step(k, self.weights(state))
        return state
