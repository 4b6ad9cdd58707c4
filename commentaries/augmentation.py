"""Label-pair augmentation commentaries (Raghu et al. 2021, Section 4.2).

The commentary is a grid ``φ`` of ``N×N`` class pairs. A batch is paired with
a shuffled copy of itself and blended,

    x = λ x₁ + (1 − λ) x₂,   y = λ onehot(y₁) + (1 − λ) onehot(y₂),
    λ = 1 − 0.5 · sigmoid(φ[y₁, y₂])  ∈ [0.5, 1],

so the grid says how much of which other class to mix into an example.
``φ`` is learned jointly with one student by implicit differentiation
(Algorithm 2: one Neumann term, Adam inner and outer), or for small cases by
backpropagating through the training of fresh students (Algorithm 1).

Policies (``policy:``) for evaluating fresh students with a frozen commentary:
``learned``; ``shuffled`` (the learned grid's entries permuted);
``random`` (λ ~ U[0.5, 1] per class pair); ``mixup`` (λ ~ Beta(α, α) per
example, Zhang et al. 2018); ``none`` (no blending).
"""
import types

import torch
import torch.nn.functional as F
from torch.func import functional_call

import linear_solvers
from commentaries import TEACHERS, storage
from commentaries.common import (
    FrozenTeaching, build_student, check_choice, check_float, check_int, evaluation_generator, evaluation_options,
    fresh_weights, save_figure, set_grads, soft_cross_entropy, train_students)
from commentaries.loop import TeachingMethod
from hypergradients import gradient_step, implicit, unrolled

POLICIES = ("learned", "shuffled", "random", "mixup", "none")


# ----------------------------------------------------------------------------
# Blending


def proportions_from_grid(grid):
    """λ grid in [0.5, 1] from the learned logits φ."""
    return 1.0 - 0.5 * torch.sigmoid(grid)


def random_proportions(num_classes, generator):
    """The random-commentary baseline: λ ~ U[0.5, 1] independently per class pair."""
    return 0.5 + 0.5 * torch.rand(num_classes, num_classes, generator=generator)


def shuffle_grid(grid, generator):
    """The learned grid with its ``N²`` entries randomly permuted: same values,
    no relation to the class pairs."""
    order = torch.randperm(grid.numel(), generator=generator).to(grid.device)
    return grid.flatten()[order].reshape(grid.shape)


def mixup_proportions(count, alpha=1.0, device="cpu"):
    """λ ~ Beta(α, α) per example (the global torch RNG, seeded per run)."""
    concentration = torch.tensor(float(alpha))
    return torch.distributions.Beta(concentration, concentration).sample((count,)).to(device)


def blend(x, y, lam, partner, num_classes):
    """Blend each example with ``partner`` (an index permutation) by ``lam``."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    mixed_x = lam.view(shape) * x + (1 - lam.view(shape)) * x[partner]
    mixed_y = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner]
    return mixed_x, mixed_y


def grid_loss(model_call, grid, x, y, partner, num_classes):
    """Mean soft cross-entropy on a batch blended by ``φ`` (differentiable in φ)."""
    lam = proportions_from_grid(grid)[y, y[partner]]
    mixed_x, mixed_y = blend(x, y, lam, partner, num_classes)
    return soft_cross_entropy(model_call(mixed_x), mixed_y).mean()


class Policy(FrozenTeaching):
    """A frozen augmentation policy: how λ is drawn for a batch."""

    def __init__(self, kind, proportions=None, mixup_alpha=1.0, num_classes=None):
        self.kind, self.proportions, self.mixup_alpha, self.num_classes = kind, proportions, mixup_alpha, num_classes

    def sample(self, y, partner):
        if self.kind == "none":
            return torch.ones(len(y), device=y.device)
        if self.kind == "mixup":
            return mixup_proportions(len(y), self.mixup_alpha, y.device)
        return self.proportions[y, y[partner]]

    def loss(self, model, x, y, progress):
        if self.kind == "none":
            return F.cross_entropy(model(x), y)
        partner = torch.randperm(len(y), device=y.device)
        mixed_x, mixed_y = blend(x, y, self.sample(y, partner), partner, self.num_classes)
        return soft_cross_entropy(model(mixed_x), mixed_y).mean()


# ----------------------------------------------------------------------------
# Objectives: what each route lowers, evaluated reproducibly


def grid_hypergradient(student, weights, grid, batch, partner, validation, lr, neumann_steps):
    """Algorithm 2's grid gradient at the current student weights: the implicit
    hypergradient of the validation loss through the SGD map
    ``w - lr ∇_w L_T(w, φ)`` of the loss on ``batch`` blended by ``φ``
    (``neumann_steps=1``, the paper's setting: no Hessian-vector product).
    Returns :class:`hypergradients.Hypergradient` (``value``: ``L_V``)."""
    (x, y), num_classes = batch, grid.shape[0]

    def training_loss(weights, grid):
        return grid_loss(lambda inputs: functional_call(student, weights, (inputs,)), grid, x, y, partner,
                         num_classes)

    def validation_loss(weights, grid):
        return F.cross_entropy(functional_call(student, weights, (validation[0],)), validation[1])

    weights = {name: w.detach() for name, w in weights.items()}
    return implicit(gradient_step(training_loss, lr), validation_loss, weights, grid.detach(),
                    solve=linear_solvers.neumann, iterations=neumann_steps)


def unrolled_problem(student, data, batch_size, inner_steps, inner_lr, generator):
    """``(step, validation_loss)`` of Algorithm 1 for :func:`hypergradients.unrolled`:
    ``step(w, φ, k)`` is the SGD step ``w - α ∇_w L_k(w, φ)`` on the ``k``-th
    blended batch (aux: ``L_k``), with every step's batch and pairing drawn
    up front so that a recomputed step (``chunk_size``) is the step that ran;
    ``validation_loss(w, φ)`` is the cross-entropy on the validation set."""
    inputs, labels, n = data.training_inputs, data.training_targets, data.output_size
    batches = torch.randint(0, len(inputs), (inner_steps, batch_size), generator=generator).to(inputs.device)
    partners = torch.stack([torch.randperm(batch_size, generator=generator) for _ in range(inner_steps)])
    partners = partners.to(inputs.device)

    def step(weights, grid, k):
        def blended_loss(weights, grid):
            x, y = inputs[batches[k]], labels[batches[k]]
            return grid_loss(lambda batch: functional_call(student, weights, (batch,)), grid, x, y, partners[k], n)
        return gradient_step(blended_loss, inner_lr)(weights, grid)

    def validation_loss(weights, grid):
        return F.cross_entropy(functional_call(student, weights, (data.validation_inputs,)), data.validation_targets)

    return step, validation_loss


def detached_parameters(module):
    return {name: p.detach() for name, p in module.named_parameters()}


def unrolled_objective(grid, data, student_spec, *, inner_steps, inner_lr, batch_size, seeds):
    """Validation loss after ``inner_steps`` blended SGD steps from fixed
    student initialisations and batches: what Algorithm 1 lowers."""
    losses = []
    grid = grid.detach()
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            fresh = build_student(student_spec, data, "teaching.student").to(data.training_inputs.device)
        step, validation_loss = unrolled_problem(fresh, data, batch_size, inner_steps, inner_lr,
                                                 torch.Generator().manual_seed(20_000 + seed))
        weights = detached_parameters(fresh)
        for k in range(inner_steps):
            weights, _ = step(weights, grid, k)
        losses.append(float(validation_loss(weights, grid)))
    return sum(losses) / len(losses)


def policy_objective(proportions, data, student_spec, seeds, device, *, steps, lr, batch_size):
    """Validation loss of fresh students trained with the frozen grid as
    Algorithm 2 trains its student (Adam, ``steps`` steps) from fixed seeds:
    the objective the jointly learned grid is meant to lower."""
    quiet = types.SimpleNamespace(tracker=None, device=device)
    options = {"steps": steps, "lr": lr, "batch_size": batch_size, "optimiser": "Adam", "log_interval": steps}
    policy = Policy("learned", proportions, num_classes=data.output_size)
    losses = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            metrics = train_students([student_spec], data, policy, options, quiet,
                                     torch.Generator().manual_seed(20_000 + seed))
        losses.append(metrics["Loss/Validation"])
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------
# Plot


def plot_proportions(proportions, title, context, step):
    """Heatmap of λ: how much of its own image each class pair keeps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = proportions.detach().cpu().numpy()
    n = grid.shape[0]
    figure, axis = plt.subplots(figsize=(5.6, 4.8))
    image = axis.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            axis.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if grid[i, j] < 0.75 else "black")
    axis.set(xticks=range(n), yticks=range(n), xlabel="partner class y₂", ylabel="example class y₁",
             title=title)
    figure.colorbar(image, ax=axis, label="λ (share of the example's own image)")
    save_figure(figure, context, "blending_proportions", step)


# ----------------------------------------------------------------------------
# The registered method


@TEACHERS.register("Augmentation")
class Augmentation(TeachingMethod):
    """Learn a label-pair blending grid (``policy: learned`` or ``shuffled``,
    unless ``commentary:`` names a saved one) or build a baseline policy, then
    train fresh students with it; ``objective`` is their mean final
    validation loss.

    ``method: implicit`` (Algorithm 2): one outer step is one Adam step of a
    student on a blended batch and, every ``hyper_every`` steps, a grid step
    along the implicit hypergradient of the full validation loss.
    ``method: unrolled`` (Algorithm 1): one outer step is one grid step through
    a fresh student's ``inner_steps`` SGD steps."""

    def __init__(self, *, context, data=None, policy="learned", method="implicit", commentary=None, student=None,
                 steps=500, lr=0.001, batch_size=64, grid_lr=0.05, hyper_every=1, neumann_steps=1,
                 neumann_lr=0.1, teacher_steps=50, inner_steps=10, inner_lr=0.3, chunk_size=0, mixup_alpha=1.0,
                 evaluation_students=None, evaluation_steps=500, evaluation_lr=0.001, objective_seeds=2,
                 log_interval=25):
        self.policy = check_choice(policy, "policy", POLICIES)
        self.method = check_choice(method, "method", ("implicit", "unrolled"))
        for key, value in (("steps", steps), ("batch_size", batch_size), ("hyper_every", hyper_every),
                           ("neumann_steps", neumann_steps), ("inner_steps", inner_steps),
                           ("evaluation_steps", evaluation_steps), ("objective_seeds", objective_seeds),
                           ("log_interval", log_interval)):
            check_int(value, key, 1)
        check_int(teacher_steps, "teacher_steps", 0)
        check_int(chunk_size, "chunk_size", 0)
        for key, value in (("lr", lr), ("grid_lr", grid_lr), ("neumann_lr", neumann_lr), ("inner_lr", inner_lr),
                           ("mixup_alpha", mixup_alpha), ("evaluation_lr", evaluation_lr)):
            check_float(value, key, 0.0, strict_minimum=key not in ("grid_lr",))
        self.evaluation_students, self.evaluation = evaluation_options(
            evaluation_students, steps=evaluation_steps, lr=evaluation_lr, batch_size=batch_size,
            log_interval=log_interval)
        self.commentary, self.mixup_alpha = commentary, mixup_alpha
        self.student_lr, self.batch_size, self.grid_lr, self.hyper_every = lr, batch_size, grid_lr, hyper_every
        self.neumann_steps, self.neumann_lr, self.chunk_size = neumann_steps, neumann_lr, chunk_size
        self.inner_steps, self.inner_lr, self.objective_seeds = inner_steps, inner_lr, range(objective_seeds)
        self.joint_steps, self.log_interval = steps, log_interval
        self.student_spec = student or {"class": "CNN", "width": 16}
        self.use_data(data, context)
        self.saved = None
        if commentary is not None and self.policy in ("learned", "shuffled"):
            payload = storage.load_teacher(commentary, method="Augmentation")
            self.saved = payload["tensors"]["proportions"].to(context.device)
        self.learning = self.policy in ("learned", "shuffled") and commentary is None
        self.steps = (steps if self.method == "implicit" else teacher_steps) if self.learning else 0
        self.record = {}

    def setup(self):
        device = self.context.device
        self.generator = torch.Generator().manual_seed(self.context.seed)
        if not self.learning:
            return
        self.grid = torch.zeros(self.data.output_size, self.data.output_size, device=device, requires_grad=True)
        self.student = build_student(self.student_spec, self.data, "teaching.student").to(device)
        self.outer = torch.optim.Adam([self.grid], lr=self.grid_lr)
        if self.method == "implicit":
            self.weights = fresh_weights(self.student, device)
            self.inner = torch.optim.Adam(self.weights.values(), lr=self.student_lr)

    def checkpointed(self):
        if not self.learning:
            return {}
        state = {"grid": self.grid, "outer": self.outer, "generator": self.generator, "record": self.record}
        if self.method == "implicit":
            state.update(weights=self.weights, inner=self.inner)
        return state

    def objective(self):
        seeds = self.objective_seeds
        if self.method == "implicit":
            return policy_objective(proportions_from_grid(self.grid.detach()), self.data, self.student_spec, seeds,
                                    self.context.device, steps=self.joint_steps, lr=self.student_lr,
                                    batch_size=self.batch_size)
        return unrolled_objective(self.grid, self.data, self.student_spec, inner_steps=self.inner_steps,
                                  inner_lr=self.inner_lr, batch_size=self.batch_size, seeds=seeds)

    def begin(self):
        if self.learning:
            self.record["objective_initial"] = self.objective()

    def outer_step(self, step):
        return self.implicit_step(step) if self.method == "implicit" else self.unrolled_step()

    def implicit_step(self, step):
        """Algorithm 2: a student step on a blended batch; every ``hyper_every``
        steps a grid step along the implicit hypergradient at the current weights."""
        data, device, n = self.data, self.context.device, self.data.output_size
        call = lambda w: lambda inputs: functional_call(self.student, w, (inputs,))  # noqa: E731
        indices = torch.randint(0, len(data.training_inputs), (self.batch_size,), generator=self.generator).to(device)
        x, y = data.training_inputs[indices], data.training_targets[indices]
        partner = torch.randperm(self.batch_size, generator=self.generator).to(device)
        loss = grid_loss(call(self.weights), self.grid, x, y, partner, n)
        self.inner.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.weights.values()))
        self.inner.step()
        metrics = {"Loss/Training": loss.detach()}
        if (step + 1) % self.hyper_every == 0:
            result = grid_hypergradient(self.student, self.weights, self.grid, (x, y), partner,
                                        (data.validation_inputs, data.validation_targets), self.neumann_lr,
                                        self.neumann_steps)
            set_grads([self.grid], [result.gradient])
            self.outer.step()
            metrics["Loss/Validation"] = result.value
        return metrics

    def unrolled_step(self):
        """Algorithm 1 for small cases: a fresh student takes ``inner_steps`` SGD
        steps on blended batches; its validation loss is backpropagated through
        them into the grid."""
        fresh = build_student(self.student_spec, self.data, "teaching.student").to(self.context.device)
        step, validation_loss = unrolled_problem(self.student, self.data, self.batch_size, self.inner_steps,
                                                 self.inner_lr, self.generator)
        result = unrolled(step, detached_parameters(fresh), self.grid.detach(), self.inner_steps, validation_loss,
                          chunk_size=self.chunk_size or None)
        set_grads([self.grid], [result.gradient])
        self.outer.step()
        return {"Loss/Validation": result.value}

    def proportions(self):
        """λ for the chosen policy (``None`` for ``mixup`` and ``none``)."""
        learned = proportions_from_grid(self.grid.detach()) if self.learning else self.saved
        if self.policy == "learned":
            return learned
        if self.policy == "shuffled":
            return shuffle_grid(learned, self.generator)
        if self.policy == "random":
            return random_proportions(self.data.output_size, self.generator).to(self.context.device)
        return None

    def finish(self, steps_done):
        teaching = dict(self.record)
        if self.learning:
            teaching["objective_learned"] = self.objective()
            self.context.tracker.scalar("Commentary/Objective_Initial", teaching["objective_initial"], steps_done)
            self.context.tracker.scalar("Commentary/Objective_Learned", teaching["objective_learned"], steps_done)
        self.final_proportions = self.proportions()
        if self.final_proportions is not None:
            plot_proportions(self.final_proportions, f"{self.data.name}: {self.policy} blending proportions λ",
                             self.context, steps_done)
        policy = Policy(self.policy, self.final_proportions, self.mixup_alpha, self.data.output_size)
        final = train_students(self.evaluation_students, self.data, policy, self.evaluation, self.context,
                               evaluation_generator(self.context.seed))
        return {"final": final, "teaching": teaching}

    def export(self):
        if self.commentary is not None or self.final_proportions is None:
            return None
        if not self.learning:
            return {"tensors": {"proportions": self.final_proportions}, "dataset": self.data_spec,
                    "learned_by": {"algorithm": self.policy},
                    "config": {"policy": self.policy, "student": self.student_spec}}
        grid = self.grid.detach()
        route = ({"algorithm": "implicit (Algorithm 2)", "steps": self.steps, "neumann_steps": self.neumann_steps}
                 if self.method == "implicit" else
                 {"algorithm": "unrolled (Algorithm 1)", "teacher_steps": self.steps, "inner_steps": self.inner_steps})
        return {"tensors": {"grid": grid, "proportions": proportions_from_grid(grid)}, "dataset": self.data_spec,
                "learned_by": {**route, "seed": self.context.seed},
                "config": {"policy": "learned", "method": self.method, "student": self.student_spec}}

    @classmethod
    def frozen_teaching(cls, payload, data, device):
        proportions = payload["tensors"]["proportions"].to(device)
        if proportions.shape != (data.output_size, data.output_size):
            raise ValueError(f"the saved grid is {tuple(proportions.shape)}, the data has {data.output_size} classes")
        return Policy(payload["config"].get("policy", "learned"), proportions, num_classes=data.output_size)
