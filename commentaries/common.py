"""Shared pieces of the learning-to-teach methods.

Students are tiny ``nn.Module`` s run through ``torch.func.functional_call``
with their weights held in a plain dict, so a weight update can stay inside
the autograd graph (Algorithm 1) or be differentiated at its fixed point
(Algorithm 2). The two hypergradient routes live here once:

* :func:`unrolled_hypergradient` -- backpropagate through ``K`` SGD steps,
  optionally memory-bounded (exact checkpointing over chunks of steps, or a
  truncated window of the last steps);
* :func:`implicit_hypergradient` -- the implicit function theorem at the
  current weights, with ``linear_solvers.neumann`` for the inverse.

Also: option validation (``teaching.<key>: ...`` user errors), figure logging,
atomic file writes and a meter of live saved-tensor bytes for memory benches.
"""
import contextlib
import io
import math
import os
import tempfile
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import linear_solvers
from errors import UserError
from registry import Registry

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
# Students: small networks that work under functional_call

STUDENTS = Registry("student")

ACTIVATIONS = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "ELU": nn.ELU}


def _activation(name, where):
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


@STUDENTS.register("CNN", aliases=["TwoBlockCNN"])
def cnn(*, in_channels, image_size, num_outputs, width=16, activation="ReLU"):
    """Two conv blocks (3x3 conv, activation, 2x2 max-pool) and a linear head."""
    act = _activation(activation, "student")
    spatial = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(width * spatial * spatial, num_outputs))


@STUDENTS.register("MLP")
def mlp(*, in_channels, image_size, num_outputs, hidden=(64,), activation="ReLU"):
    """A fully connected network on the flattened image."""
    act = _activation(activation, "student")
    layers, width = [nn.Flatten()], in_channels * image_size * image_size
    for size in hidden:
        layers += [nn.Linear(width, int(size)), act()]
        width = int(size)
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


@STUDENTS.register("Linear")
def linear(*, in_channels, image_size, num_outputs):
    """Multinomial logistic regression: the convex student of the exact tests."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_outputs))


def build_student(spec, where, **shape):
    """A student module from ``{class: CNN, width: 8}``; shapes are injected."""
    if spec is None:
        spec = {"class": "CNN"}
    if isinstance(spec, str):
        spec = {"class": spec}
    return STUDENTS.build(dict(spec), where, **shape)


def fresh_weights(module, device, dtype=torch.float32):
    """A detached copy of ``module``'s parameters that requires grad."""
    return {name: p.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
            for name, p in module.named_parameters()}


def detached(weights):
    return {name: w.detach().requires_grad_(True) for name, w in weights.items()}


# ----------------------------------------------------------------------------
# Losses


def soft_cross_entropy(logits, targets):
    """Per-example cross-entropy against soft (blended) label distributions."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def accuracy(logits, labels):
    return (logits.argmax(-1) == labels).float().mean()


# ----------------------------------------------------------------------------
# Algorithm 1: backpropagation through K inner SGD steps


def _sgd_steps(inner_loss, weights, hyper, steps, lr, create_graph):
    """Run ``steps`` (a range of step indices) of SGD on ``inner_loss``."""
    names = list(weights)
    for step in steps:
        loss = inner_loss(weights, hyper, step)
        grads = torch.autograd.grad(loss, [weights[n] for n in names], create_graph=create_graph)
        if create_graph:
            weights = {n: weights[n] - lr * g for n, g in zip(names, grads)}
        else:
            weights = {n: (weights[n] - lr * g).detach().requires_grad_(True)
                       for n, g in zip(names, grads)}
    return weights


def _grad_or_zero(output, inputs, grad_outputs=None, retain_graph=None):
    grads = torch.autograd.grad(output, inputs, grad_outputs=grad_outputs,
                                retain_graph=retain_graph, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


def unrolled_hypergradient(inner_loss, outer_loss, weights, hyper, num_steps, lr,
                           chunk_size=0, truncation=0):
    """Gradient of ``outer_loss(w_K, hyper)`` with respect to ``hyper``, where
    ``w_{k+1} = w_k - lr * ∇_w inner_loss(w_k, hyper, k)`` starts from ``weights``.

    Memory-bounded modes (``0`` = off):

    * ``chunk_size=C`` -- exact gradient checkpointing: the forward pass keeps
      only every ``C``-th weight state; the backward pass recomputes one chunk
      at a time with its graph and pulls the adjoint through it, so the peak
      holds one chunk's graph instead of ``K`` steps' graphs.
    * ``truncation=T`` -- differentiate through the last ``T`` steps only (a
      biased, cheaper estimate: the first ``K - T`` steps run without a graph).

    ``inner_loss(w, hyper, k)`` must be deterministic in ``k`` (precompute
    mini-batch indices) so a recomputed chunk is the chunk that was run.
    Returns ``(outer loss (detached), final weights (detached), hypergradient tuple)``.
    """
    hyper = tuple(hyper)
    constant = tuple(h.detach() for h in hyper)  # steps run without a graph need none to the teacher either
    weights = detached(weights)
    if truncation and truncation < num_steps:
        weights = _sgd_steps(inner_loss, weights, constant, range(num_steps - truncation), lr, False)
        first = num_steps - truncation
    else:
        first = 0
    if not chunk_size or chunk_size >= num_steps - first:
        final = _sgd_steps(inner_loss, weights, hyper, range(first, num_steps), lr, True)
        loss = outer_loss(final, hyper)
        return loss.detach(), {n: w.detach() for n, w in final.items()}, _grad_or_zero(loss, hyper)

    boundaries = []
    for start in range(first, num_steps, chunk_size):
        boundaries.append((start, weights))
        weights = _sgd_steps(inner_loss, weights, constant, range(start, min(start + chunk_size, num_steps)),
                             lr, False)
    names = list(weights)
    loss = outer_loss(weights, hyper)
    adjoint_and_direct = _grad_or_zero(loss, [weights[n] for n in names] + list(hyper))
    adjoint, total = adjoint_and_direct[:len(names)], list(adjoint_and_direct[len(names):])
    for start, start_weights in reversed(boundaries):
        start_weights = detached(start_weights)
        end = _sgd_steps(inner_loss, start_weights, hyper, range(start, min(start + chunk_size, num_steps)),
                         lr, True)
        grads = _grad_or_zero([end[n] for n in names], [start_weights[n] for n in names] + list(hyper),
                              grad_outputs=list(adjoint))
        adjoint = grads[:len(names)]
        total = [t + g for t, g in zip(total, grads[len(names):])]
    return loss.detach(), {n: w.detach() for n, w in weights.items()}, tuple(total)


# ----------------------------------------------------------------------------
# Algorithm 2: implicit differentiation at the current weights


def implicit_hypergradient(training_loss, validation_loss, weights, hyper, neumann_steps=1, lr=1.0):
    """IFT hypergradient ``∂L_V/∂λ + ∂L_V/∂w (I - J)^{-1} ∂u/∂λ`` for the update
    ``u(w, λ) = w - lr ∇_w L_T(w, λ)``, so ``J = I - lr H`` and
    ``∂u/∂λ = -lr ∂²L_T/∂w∂λ``.

    ``neumann_steps`` terms of the Neumann series approximate the inverse
    (``1`` = no Hessian-vector product: Raghu et al.'s setting for augmentation).
    ``validation_loss(w, λ)`` may depend on ``λ`` directly (attention masks are
    applied to validation images too); that direct term is included.
    Returns ``(validation loss (detached), hypergradient tuple)``.
    """
    hyper = tuple(hyper)
    names = list(weights)
    params = [weights[n] for n in names]
    val_loss = validation_loss(weights, hyper)
    grads = _grad_or_zero(val_loss, params + list(hyper))
    b, direct = grads[:len(params)], grads[len(params):]
    train_grads = torch.autograd.grad(training_loss(weights, hyper), params, create_graph=True)

    def vjp(v):
        hessian_v = _grad_or_zero(train_grads, params, grad_outputs=list(v), retain_graph=True)
        return tuple(vi - lr * hv for vi, hv in zip(v, hessian_v))

    x, _ = linear_solvers.neumann(vjp, b, neumann_steps)
    mixed = _grad_or_zero(train_grads, hyper, grad_outputs=list(x))
    return val_loss.detach(), tuple(d - lr * m for d, m in zip(direct, mixed))


def set_grads(tensors, grads):
    for tensor, grad in zip(tensors, grads):
        tensor.grad = grad.detach().clone()


# ----------------------------------------------------------------------------
# Memory: live bytes of tensors saved for backward


class SavedTensorMeter:
    """Counts the bytes of tensors autograd saves for backward that are still
    alive, and the peak of that count, through ``saved_tensors_hooks``.

    This is the memory a differentiable unroll grows with, measured exactly and
    on any device (``tracemalloc`` cannot see torch allocations). Tensors saved
    twice are counted twice: an upper bound on the true footprint.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0

    def _release(self, size):
        self.live -= size

    def _pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        box = _Box(tensor.detach())  # autograd restores the metadata on unpack; a
        # box holding the tensor itself would form an uncollectable cycle with its grad_fn
        weakref.finalize(box, self._release, size)
        return box

    @staticmethod
    def _unpack(box):
        return box.tensor

    @contextlib.contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


# ----------------------------------------------------------------------------
# Files and figures


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_figure(figure, context, name, step=0):
    """Write ``figure`` as ``<run_dir>/<name>.png`` (atomically) and log it as a
    TensorBoard image under ``Commentary/<name>``; closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    path = context.run_dir / f"{name}.png"
    atomic_write_bytes(path, buffer.getvalue())
    if getattr(context, "writer", None) is not None:
        context.writer.add_figure(f"Commentary/{name}", figure, global_step=step, close=False)
    plt.close(figure)
    return path


class RunningMean:
    """Losses summed on the device and counted, averaged only when logged:
    no per-step host synchronisation."""

    def __init__(self, device):
        self.total = torch.zeros((), device=device)
        self.count = 0

    def add(self, value):
        self.total += value.detach()
        self.count += 1

    def pop(self):
        """The mean since the last call (a device tensor), or ``None`` if nothing was added."""
        if not self.count:
            return None
        mean = self.total / self.count
        self.total = torch.zeros_like(self.total)
        self.count = 0
        return mean


def log_interval_losses(writer, training_loss, validation_losses, step):
    """Log the last training loss and the mean validation loss of the interval (if any)."""
    values = {"Loss/Training": training_loss.detach()}
    validation = validation_losses.pop()
    if validation is not None:
        values["Loss/Validation"] = validation
    log_scalars(writer, values, step)


def log_scalars(writer, values, step, prefix=""):
    """Log a dict of scalars (tensors allowed: one host sync per call)."""
    if writer is None:
        return
    for tag, value in values.items():
        writer.add_scalar(prefix + tag, float(value), step)


def progress_bar(total, context, description):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=not getattr(context, "progress", False),
                leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------
# Training and evaluating a fresh student with a frozen commentary


@torch.no_grad()
def evaluate_student(model, data, predict, batch_size=1024):
    """Full-split cross-entropy and accuracy of ``predict(model, x) -> logits``."""
    metrics = {}
    for split, title in (("train", "Training"), ("val", "Validation"), ("test", "Test")):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        loss_sum, correct = 0.0, 0.0
        for start in range(0, len(x), batch_size):
            logits = predict(model, x[start:start + batch_size])
            labels = y[start:start + batch_size]
            loss_sum = loss_sum + F.cross_entropy(logits, labels, reduction="sum")
            correct = correct + (logits.argmax(-1) == labels).sum()
        metrics[f"Loss/{title}"] = float(loss_sum) / len(x)
        metrics[f"Accuracy/{title}"] = float(correct) / len(x)
    return metrics


def train_student(model, data, batch_loss, predict, *, steps, lr, batch_size, optimiser="Adam",
                  generator, context, prefix, log_interval=25, description="student"):
    """Train ``model`` for ``steps`` mini-batch steps on ``batch_loss(model, x, y,
    progress, indices)`` (the commentary decides how a batch is weighted,
    blended or masked) and log its learning curves under ``prefix``.

    ``progress`` is the normalised training iteration in [0, 1), the extra input
    of a curriculum teacher. Host syncs happen only every ``log_interval`` steps.
    Returns the final metrics of :func:`evaluate_student`.
    """
    device = data.train_x.device
    optimisers = {"Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
    optimiser = optimisers[optimiser](model.parameters(), lr=lr)
    writer = getattr(context, "writer", None)
    running = torch.zeros((), device=device)
    count = 0
    with progress_bar(steps, context, description) as bar:
        for step in range(steps):
            indices = torch.randint(0, len(data.train_x), (batch_size,), generator=generator).to(device)
            loss = batch_loss(model, data.train_x[indices], data.train_y[indices], step / steps, indices)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += loss.detach()
            count += 1
            bar.update()
            if (step + 1) % log_interval == 0 or step + 1 == steps:
                metrics = evaluate_student(model, data, predict)
                metrics["Loss/Batch"] = float(running) / count
                running.zero_()
                count = 0
                log_scalars(writer, metrics, step + 1, prefix=prefix)
                bar.set_postfix(val=f"{metrics['Loss/Validation']:.3f}")
    return metrics


def evaluation_generator(seed):
    """Reseed for the evaluation students: at a given run seed every method and
    baseline then trains them from the same initialisations and batch order,
    whatever random numbers learning its commentary consumed (paired comparisons)."""
    torch.manual_seed(seed + 7919)
    return torch.Generator().manual_seed(seed + 7919)


def mean_metrics(list_of_metrics):
    keys = list_of_metrics[0]
    return {k: sum(m[k] for m in list_of_metrics) / len(list_of_metrics) for k in keys}
