"""AuxiLearn (Navon et al., ICLR 2021): learning to combine auxiliary losses.

A multi-task network (shared trunk, one head per task) is trained on the main
task plus auxiliary tasks. An *auxiliary network* maps each example's vector of
auxiliary losses to one non-negative loss that is added to the main loss:

* ``linear``: ``Σ_k a_k ℓ_k`` with ``a_k = softplus(θ_k) ≥ 0``;
* ``nonlinear``: a monotone MLP (non-negative weights, softplus activations),
  AuxiLearn's nonlinear combiner.

Every ``update_every`` weight steps the auxiliary network is updated by the
implicit function theorem: at (approximately) optimal weights ``w*`` of the
training loss ``L_T(w, θ)``, the main-task loss ``L_A`` on a held-out
*auxiliary set* has

    dL_A/dθ = -∂L_A/∂w · H⁻¹ · ∂²L_T/∂w∂θ,

with the inverse-Hessian product approximated by a truncated Neumann series
(``linear_solvers.neumann`` on the SGD map ``u(w) = w - α ∇L_T``): the core's
:func:`hypergradients.implicit`. This goes through :class:`MetaOptimizer`,
whose ``step(val_loss=..., train_loss=..., aux_params=..., parameters=...)``
follows AuxiLearn's wrapper of the same name, except that the losses are
functions of ``(weights, auxiliary parameters)`` rather than tensors: the
implicit hypergradient differentiates them under ``torch.func``.

Auxiliary tasks on the embedded digits: ``parity`` (even/odd, helpful),
``rotation`` (which of 0/90/180/270° the input was rotated by,
self-supervised) and ``noisy_labels`` (the main head trained on fixed random
labels: label noise, harmful): a learned weighting should turn it down. Baselines: ``learn_weighting:
false`` (equal weighting, the auxiliary network frozen at its all-ones
initialisation) and ``auxiliary_tasks: []`` (main task only).
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import linear_solvers  # noqa: E402
from commentaries import TEACHERS  # noqa: E402
from commentaries.common import (DIGITS, check_bool, check_choice, check_float, check_int,  # noqa: E402
                                 save_figure, split_pairs)
from commentaries.loop import TeachingMethod  # noqa: E402
from errors import UserError  # noqa: E402
from hypergradients import gradient_step, implicit  # noqa: E402
from trees import tree_leaves, tree_map  # noqa: E402

# name -> classes of its own head; noisy_labels reuses the main head (random labels)
AUXILIARY_TASKS = {"parity": 2, "rotation": 4, "noisy_labels": None}
COMBINERS = ("linear", "nonlinear")


# ----------------------------------------------------------------------------- networks

class MultiTaskNet(nn.Module):
    """Shared MLP trunk with a linear head for the main task and each auxiliary task."""

    def __init__(self, input_size, hidden_size, tasks, num_classes=10):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(input_size, hidden_size), nn.ReLU(),
                                   nn.Linear(hidden_size, hidden_size), nn.ReLU())
        sizes = {"main": num_classes, **{task: AUXILIARY_TASKS[task] for task in tasks
                                         if AUXILIARY_TASKS[task] is not None}}
        self.heads = nn.ModuleDict({task: nn.Linear(hidden_size, size) for task, size in sizes.items()})

    def forward(self, images, task="main"):
        """The logits of ``task``; for a list of tasks, a tuple of their logits
        from one pass through the trunk."""
        features = self.trunk(images)
        if isinstance(task, str):
            return self.heads[task](features)
        return tuple(self.heads[name](features) for name in task)


def inverse_softplus(value):
    return math.log(math.expm1(value))


class LinearCombiner(nn.Module):
    """``main + Σ_k softplus(θ_k) ℓ_k``, averaged over the batch; starts at equal weights."""

    def __init__(self, num_tasks, initial_weight=1.0):
        super().__init__()
        self.raw = nn.Parameter(torch.full((num_tasks,), inverse_softplus(initial_weight)))

    def weights(self):
        return F.softplus(self.raw)

    def forward(self, main_losses, auxiliary_losses):
        return (main_losses + auxiliary_losses @ self.weights()).mean()


class NonlinearCombiner(nn.Module):
    """``main + g(ℓ)`` with ``g`` a monotone MLP: non-negative weights (softplus of
    free parameters) and softplus activations, so ``g ≥ 0`` and it never
    rewards a larger auxiliary loss. AuxiLearn's nonlinear auxiliary network."""

    def __init__(self, num_tasks, hidden_size=8):
        super().__init__()
        self.raw_hidden = nn.Parameter(torch.randn(hidden_size, num_tasks) * 0.1
                                       + inverse_softplus(1.0 / hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.raw_output = nn.Parameter(torch.full((hidden_size,), inverse_softplus(1.0)))

    def forward(self, main_losses, auxiliary_losses):
        hidden = F.softplus(auxiliary_losses @ F.softplus(self.raw_hidden).T + self.bias)
        return (main_losses + hidden @ F.softplus(self.raw_output)).mean()


def effective_weights(combiner, main_losses, auxiliary_losses):
    """d(combined loss)/d(auxiliary loss k), summed over the batch: the weight each
    auxiliary task effectively gets (exactly ``a_k`` for the linear combiner)."""
    auxiliary_losses = auxiliary_losses.detach().requires_grad_()
    with torch.enable_grad():
        combined = combiner(main_losses.detach(), auxiliary_losses)
        (grad,) = torch.autograd.grad(combined, auxiliary_losses)
    return grad.sum(0)


# ----------------------------------------------------------------------------- hypergradient

class MetaOptimizer:
    """Wraps the optimiser of the auxiliary parameters, in the spirit of AuxiLearn's
    ``auxilearn.optim.MetaOptimizer``: ``step`` computes the implicit hypergradient,
    clips its norm and takes one step of the wrapped optimiser."""

    def __init__(self, meta_optimizer, hypergradient_lr, neumann_steps=4, max_grad_norm=10.0,
                 solver="neumann"):
        self.meta_optimizer = meta_optimizer
        self.hypergradient_lr = hypergradient_lr
        self.neumann_steps = neumann_steps
        self.max_grad_norm = max_grad_norm
        self.solve = linear_solvers.get_solver(solver, "teaching.solver")
        self.last_norm = None  # norm of the latest hypergradient, a tensor (no host sync)

    def hypergradient(self, *, val_loss, train_loss, aux_params, parameters):
        """``dL_V/dθ`` at the weights ``parameters`` (AuxiLearn's implicit step:
        ``neumann_steps`` terms of the series on the SGD map of ``train_loss``
        with step ``hypergradient_lr``), shaped like ``aux_params``.

        ``val_loss(w, θ)`` and ``train_loss(w, θ)`` are scalar functions of the
        weights and the auxiliary parameters, written for ``torch.func``
        (``functional_call``); ``parameters`` and ``aux_params`` are dicts or
        lists of tensors (their current values; nothing is updated)."""
        result = implicit(gradient_step(train_loss, self.hypergradient_lr), val_loss, _detached(parameters),
                          _detached(aux_params), solve=self.solve, iterations=self.neumann_steps)
        return result.gradient

    def step(self, *, val_loss, train_loss, aux_params, parameters):
        """One update of ``aux_params`` (the wrapped optimiser's tensors, a dict
        or a list) along :meth:`hypergradient`; returns the (unclipped) hypergradients."""
        aux_params = aux_params if isinstance(aux_params, (dict, list, tuple)) else list(aux_params)
        parameters = parameters if isinstance(parameters, (dict, list, tuple)) else list(parameters)
        grads = self.hypergradient(val_loss=val_loss, train_loss=train_loss, aux_params=aux_params,
                                   parameters=parameters)
        tensors, gradients = tree_leaves(aux_params), tree_leaves(grads)
        self.last_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients]))
        self.meta_optimizer.zero_grad()
        for tensor, grad in zip(tensors, gradients):
            tensor.grad = grad.clone()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(tensors, self.max_grad_norm)
        self.meta_optimizer.step()
        return grads


def _detached(tree):
    return tree_map(torch.Tensor.detach, tree)


# ----------------------------------------------------------------------------- data and losses

def rotate(images, quarter_turns):
    """Each image rotated by its own multiple of 90° (``quarter_turns`` in 0..3)."""
    rotations = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    return rotations[quarter_turns, torch.arange(len(images), device=images.device)]


def quarter_turns(tasks, count, generator, device):
    """The rotation task's targets for a batch (``None`` without that task), drawn
    before the loss so that the loss is a deterministic function of the weights."""
    if "rotation" not in tasks:
        return None
    return torch.randint(4, (count,), generator=generator).to(device)


def task_losses(call, tasks, images, labels, noise_labels, turns):
    """Per-example main losses [B] and auxiliary losses [B, K] (``None`` if K = 0);
    ``call(images, task)``: the network's logits (see :meth:`MultiTaskNet.forward`)."""
    heads = ["main"] + [task for task in tasks if task == "parity"]
    logits = dict(zip(heads, call(images, heads)))
    main = F.cross_entropy(logits["main"], labels, reduction="none")
    auxiliary = []
    for task in tasks:
        if task == "parity":
            auxiliary.append(F.cross_entropy(logits["parity"], labels % 2, reduction="none"))
        elif task == "noisy_labels":
            auxiliary.append(F.cross_entropy(logits["main"], noise_labels, reduction="none"))
        else:  # rotation
            auxiliary.append(F.cross_entropy(call(rotate(images, turns), task), turns, reduction="none"))
    return main, (torch.stack(auxiliary, dim=1) if auxiliary else None)


def training_loss(model, combiner, tasks, weights, aux_params, batch, weight_decay):
    """The combined training loss L_T(w, θ) on one batch (with L2 so its Hessian is
    too), a function of the network's ``weights`` and the auxiliary network's
    ``aux_params`` (dicts of tensors) through ``functional_call``; also the
    per-example main and auxiliary losses."""
    def call(images, task):
        return functional_call(model, weights, (images, task))

    main, auxiliary = task_losses(call, tasks, *batch)
    loss = main.mean() if auxiliary is None else functional_call(combiner, aux_params, (main, auxiliary))
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum((w * w).sum() for w in weights.values())
    return loss, main, auxiliary


def main_task_metrics(model, images, labels):
    """(loss, accuracy) of the main task on a whole split, as tensors (no host sync)."""
    with torch.no_grad():
        logits = model(images)
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def auxilearn_splits(data, train_size, auxiliary_size, seed):
    """Labelled training set, held-out auxiliary set (for hypergradients), validation,
    test; plus the noisy-label task's fixed random labels for the training set."""
    splits = split_pairs(data)
    images, labels = splits["train"]
    if train_size + auxiliary_size > len(labels):
        raise UserError(f"teaching.train_size + teaching.auxiliary_size must be at most "
                        f"{len(labels)} (the digits left after validation and test)")
    splits["auxiliary"] = (images[train_size:train_size + auxiliary_size],
                           labels[train_size:train_size + auxiliary_size])
    splits["train"] = (images[:train_size], labels[:train_size])
    noise = torch.randint(data.output_size, (train_size,), generator=torch.Generator().manual_seed(seed))
    return splits, noise.to(labels.device)


# ----------------------------------------------------------------------------- plot

def plot_weights(history, tasks, context, step):
    """Effective auxiliary-task weights over training."""
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    steps = [entry[0] for entry in history]
    for index, task in enumerate(tasks):
        axis.plot(steps, [entry[1][index] for entry in history], label=task)
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="equal weighting")
    axis.set_xlabel("weight step")
    axis.set_ylabel("effective weight of auxiliary loss")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("AuxiLearn: learned auxiliary-loss weights")
    figure.tight_layout()
    save_figure(figure, context, "auxiliary_weights", step)


# ----------------------------------------------------------------------------- entry point

def check_options(tasks, combiner, learn_weighting, solver, **numbers):
    if not isinstance(tasks, (list, tuple)) or any(task not in AUXILIARY_TASKS for task in tasks) \
            or len(set(tasks)) != len(tasks):  # noqa: E129
        raise UserError(f"teaching.auxiliary_tasks: must be a list of distinct names from "
                        f"{', '.join(AUXILIARY_TASKS)}, got {tasks!r}")
    check_choice(combiner, "combiner", COMBINERS)
    check_choice(solver, "solver", tuple(sorted(linear_solvers.SOLVERS)))
    check_bool(learn_weighting, "learn_weighting")
    for key in ("steps", "train_size", "auxiliary_size", "batch_size", "hidden_size",
                "update_every", "neumann_steps", "log_interval", "combiner_hidden"):
        check_int(numbers[key], key, 1)
    check_int(numbers["warmup_steps"], "warmup_steps", 0)
    for key in ("lr", "hypergradient_lr", "outer_lr", "max_grad_norm"):
        check_float(numbers[key], key, 0.0, strict_minimum=True)
    check_float(numbers["momentum"], "momentum", 0.0, 1.0)
    check_float(numbers["weight_decay"], "weight_decay", 0.0)


@TEACHERS.register("AuxiLearn")
class AuxiLearn(TeachingMethod):
    """Train the multi-task network with a (learned or frozen) auxiliary
    weighting; one outer step is one weight step (and, every ``update_every``
    steps after the warm-up, one implicit update of the auxiliary network)."""

    def __init__(self, *, context, data=None, auxiliary_tasks=("parity", "rotation", "noisy_labels"),
                 combiner="linear", learn_weighting=True, steps=1000, train_size=300, auxiliary_size=200,
                 batch_size=64, hidden_size=64, lr=0.05, momentum=0.9, weight_decay=1e-4, update_every=10,
                 warmup_steps=100, neumann_steps=4, hypergradient_lr=0.1, solver="neumann", outer_lr=0.1,
                 max_grad_norm=10.0, combiner_hidden=8, log_interval=100):
        check_options(auxiliary_tasks, combiner, learn_weighting, solver, steps=steps, train_size=train_size,
                      auxiliary_size=auxiliary_size, batch_size=batch_size, hidden_size=hidden_size,
                      update_every=update_every, neumann_steps=neumann_steps, log_interval=log_interval,
                      combiner_hidden=combiner_hidden, warmup_steps=warmup_steps, lr=lr,
                      hypergradient_lr=hypergradient_lr, outer_lr=outer_lr, max_grad_norm=max_grad_norm,
                      momentum=momentum, weight_decay=weight_decay)
        self.context, self.tasks, self.combiner = context, list(auxiliary_tasks), combiner
        self.learn_weighting, self.steps, self.log_interval = learn_weighting, steps, log_interval
        self.train_size, self.batch_size, self.hidden_size = train_size, batch_size, hidden_size
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.update_every, self.warmup_steps, self.neumann_steps = update_every, warmup_steps, neumann_steps
        self.hypergradient_lr, self.solver, self.outer_lr = hypergradient_lr, solver, outer_lr
        self.max_grad_norm, self.combiner_hidden = max_grad_norm, combiner_hidden
        self.use_data(dict(data or DIGITS), context)
        self.splits, self.noise_labels = auxilearn_splits(self.data, train_size, auxiliary_size, context.seed)

    def setup(self):
        device, seed = self.context.device, self.context.seed
        self.rng = torch.Generator().manual_seed(seed)
        self.meta_rng = torch.Generator().manual_seed(seed + 1)  # meta batches don't shift the training order
        self.model = MultiTaskNet(self.splits["train"][0][0].numel(), self.hidden_size, self.tasks,
                                  self.data.output_size).to(device)
        self.weighting = None
        if self.tasks:
            self.weighting = (LinearCombiner(len(self.tasks)) if self.combiner == "linear"
                              else NonlinearCombiner(len(self.tasks), self.combiner_hidden)).to(device)
        self.optimiser = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)
        self.meta = None
        if self.weighting is not None and self.learn_weighting:
            self.meta = MetaOptimizer(torch.optim.Adam(self.weighting.parameters(), lr=self.outer_lr),
                                      self.hypergradient_lr, self.neumann_steps, self.max_grad_norm, self.solver)
        self.history = []  # (step, effective weights) at each log

    def checkpointed(self):
        state = {"model": self.model, "optimiser": self.optimiser, "rng": self.rng, "meta_rng": self.meta_rng}
        if self.weighting is not None:
            state["weighting"] = self.weighting
        if self.meta is not None:
            state["meta_optimiser"] = self.meta.meta_optimizer
        return state

    def state_dict(self):
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.history[:] = [(step, list(weights)) for step, weights in state["history"]]

    def batch(self, generator):
        train_images, train_labels = self.splits["train"]
        index = torch.randint(self.train_size, (self.batch_size,), generator=generator).to(train_labels.device)
        return train_images[index], train_labels[index], self.noise_labels[index]

    def aux_params(self):
        return {} if self.weighting is None else dict(self.weighting.named_parameters())

    def outer_step(self, step):
        batch = self.batch(self.rng)
        batch += (quarter_turns(self.tasks, self.batch_size, self.rng, batch[1].device),)
        loss, self.main, self.auxiliary = training_loss(self.model, self.weighting, self.tasks,
                                                        dict(self.model.named_parameters()), self.aux_params(),
                                                        batch, self.weight_decay)
        self.optimiser.zero_grad()
        loss.backward(inputs=list(self.model.parameters()))
        self.optimiser.step()
        metrics = {"Loss/Training": loss.detach()}
        if self.meta is not None and step + 1 > self.warmup_steps and (step + 1) % self.update_every == 0:
            self.meta_step()
            metrics["Hypergradient/Norm"] = self.meta.last_norm
        return metrics

    def meta_step(self):
        """One implicit update of the auxiliary network on a training batch and a batch
        of the held-out auxiliary set (its main-task loss is the outer objective)."""
        batch = self.batch(self.meta_rng)
        images, labels = self.splits["auxiliary"]
        index = torch.randint(len(labels), (self.batch_size,), generator=self.meta_rng).to(labels.device)
        batch += (quarter_turns(self.tasks, self.batch_size, self.meta_rng, labels.device),)
        images, labels = images[index], labels[index]

        def train_loss(weights, aux_params):
            return training_loss(self.model, self.weighting, self.tasks, weights, aux_params, batch,
                                 self.weight_decay)[0]

        def val_loss(weights, aux_params):
            return F.cross_entropy(functional_call(self.model, weights, (images,)), labels)

        self.meta.step(val_loss=val_loss, train_loss=train_loss, aux_params=self.aux_params(),
                       parameters=dict(self.model.named_parameters()))

    def evaluate(self, step):
        metrics = {}
        for name, tag in (("auxiliary", "Auxiliary_Set"), ("validation", "Validation")):
            metrics[f"Loss/{tag}"], metrics[f"Accuracy/{tag}"] = main_task_metrics(self.model, *self.splits[name])
        if self.weighting is not None:
            weights = effective_weights(self.weighting, self.main, self.auxiliary).tolist()
            self.history.append((step, weights))
            for task, weight in zip(self.tasks, weights):
                metrics[f"Auxiliary/Weight_{task.title()}"] = weight
        return metrics

    def finish(self, steps_done):
        final = {}
        for name, tag in (("train", "Training"), ("auxiliary", "Auxiliary_Set"), ("validation", "Validation"),
                          ("test", "Test")):
            loss, accuracy = main_task_metrics(self.model, *self.splits[name])
            final[f"Loss/{tag}"], final[f"Accuracy/{tag}"] = float(loss), float(accuracy)
        weights = {}
        if self.history:
            weights = dict(zip(self.tasks, self.history[-1][1]))
            plot_weights(self.history, self.tasks, self.context, steps_done)
        return {"final": final, "teaching": {"auxiliary_weights": weights},
                "hyperparameters": {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}}

    def export(self):
        if self.weighting is None:
            return None
        return {"tensors": self.weighting.state_dict(), "dataset": self.data_spec,
                "learned_by": {"algorithm": "implicit (AuxiLearn)", "steps": self.steps, "seed": self.context.seed,
                               "learned": self.learn_weighting},
                "teacher": {"auxiliary_tasks": self.tasks, "combiner": self.combiner,
                            "combiner_hidden": self.combiner_hidden}}
