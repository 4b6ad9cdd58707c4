"""Example-weighting commentaries learned by backpropagation through training
(Raghu et al. 2021, Algorithm 1).

A teacher ``t(x, i) -> [0, 1]`` (a two-block CNN whose extra input channel is
the normalised training iteration ``i``) weights each example's loss while a
freshly initialised student takes ``K`` SGD steps; the student's *unweighted*
validation loss is backpropagated through all ``K`` steps into the teacher.
``curriculum: false`` drops the iteration channel (the ablation).
Per-example weights are normalised within a batch (``Σ wℓ / Σ w``) so the
teacher cannot lower the loss by inflating every weight, i.e. the learning
rate; it can only choose *which* examples count.

The hypergradient is the core's :func:`hypergradients.unrolled` through the
shared inner loop (:class:`common.InnerSGD`); long unrolls are
memory-bounded with ``chunk_size`` (exact checkpointing) or ``truncation``
(last steps only). The teacher's Adam is the core's pure outer optimiser, so
the whole outer step is a pure function of the teacher, its optimiser state
and the step's random draws (a fresh student, its batches): ``--population
N`` trains N seeds as one ``torch.func.vmap`` of it.
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call

import models
import optimisers
from commentaries import TEACHERS
from commentaries.common import (
    FrozenTeaching, InnerSGD, build_student, check_bool, check_choice, check_float, check_int,
    evaluation_generator, evaluation_options, fresh_weights, reset_weights, save_figure, train_students)
from commentaries.loop import PureTeachingMethod
from hypergradients import unrolled


# ----------------------------------------------------------------------------
# The teacher and the weighted loss


def build_teacher(input_shape, curriculum=True, width=8, activation_function="ReLU"):
    """Two-block CNN with one output; input channels + 1 when ``curriculum``."""
    channels, size = input_shape[0] + int(curriculum), input_shape[-1]
    return models.cnn(channels, 1, (channels, size, size), width=width, activation_function=activation_function)


def example_weights(teacher, teacher_params, x, progress, curriculum):
    """Weights in [0, 1] for the examples ``x`` at normalised iteration ``progress``."""
    if curriculum:
        x = torch.cat([x, torch.full_like(x[:, :1], float(progress))], 1)
    return torch.sigmoid(functional_call(teacher, teacher_params, (x,)).squeeze(-1))


def weighted_loss(logits, labels, weights):
    """``Σ w ℓ / Σ w``: the teacher decides which examples count, not how much in total."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (weights * losses).sum() / (weights.sum() + 1e-8)


class Problem:
    """One bilevel problem instance: data, teacher, student architecture, inner loop."""

    def __init__(self, data, teacher, student_module, *, curriculum, inner_steps, inner_lr, batch_size,
                 student_factory=None):
        self.data, self.teacher, self.student = data, teacher, student_module
        self.student_factory = student_factory  # fresh students for :meth:`objective`
        self.curriculum, self.inner_steps, self.inner_lr = curriculum, inner_steps, inner_lr
        self.batch_size = batch_size
        self.student_names = [name for name, _ in student_module.named_parameters()]

    def sample_batches(self, generator):
        """Mini-batch indices for all ``K`` inner steps, drawn up front so a
        checkpointed chunk recomputes exactly the steps that ran."""
        shape = (self.inner_steps, self.batch_size)
        inputs = self.data.training_inputs
        return torch.randint(0, len(inputs), shape, generator=generator).to(inputs.device)

    def inner(self, batches):
        """The student's ``K`` SGD steps on the teacher-weighted ``batches``."""
        def loss(weights, teacher_params, step):
            indices = batches[step]
            x, y = self.data.training_inputs[indices], self.data.training_targets[indices]
            w = example_weights(self.teacher, teacher_params, x, step / self.inner_steps, self.curriculum)
            return weighted_loss(functional_call(self.student, weights, (x,)), y, w)
        return InnerSGD(loss, self.student_names, self.inner_lr)

    def validation_loss(self, weights):
        logits = functional_call(self.student, weights, (self.data.validation_inputs,))
        return F.cross_entropy(logits, self.data.validation_targets)

    def hypergradient(self, student_weights, teacher_params, batches, chunk_size=0, truncation=0):
        """The unweighted validation loss after ``K`` weighted steps from
        ``student_weights`` on ``batches`` and its gradient with respect to
        ``teacher_params`` (a dict by name): :func:`hypergradients.unrolled`'s
        :class:`~hypergradients.Hypergradient` (``inner``: the student's final state)."""
        inner = self.inner(batches)
        return unrolled(inner.step, inner.init(student_weights), teacher_params, self.inner_steps,
                        lambda state, _: self.validation_loss(inner.weights(state)),
                        chunk_size=chunk_size or None, truncation=truncation or None)

    def objective(self, teacher_params, seeds, device, dtype=None):
        """Mean validation loss after ``K`` weighted steps from fixed student
        initialisations and batches (one per seed): the quantity the teacher is
        trained to lower, evaluated reproducibly."""
        teacher_params = {name: value.detach() for name, value in teacher_params.items()}
        losses = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(10_000 + seed)
                weights = {name: w.detach() for name, w in
                           fresh_weights(self.student_factory(), device,
                                         dtype or torch.get_default_dtype()).items()}
            inner = self.inner(self.sample_batches(torch.Generator().manual_seed(20_000 + seed)))
            final = inner.run(inner.init(weights), teacher_params, range(self.inner_steps))
            with torch.no_grad():
                losses.append(float(self.validation_loss(inner.weights(final))))
        return sum(losses) / len(losses)


# ----------------------------------------------------------------------------
# Plots


@torch.no_grad()
def plot_weights(teacher, teacher_params, data, curriculum, context, step):
    """Learned weight against rotation at the end of training, and the rank
    correlation between weight and |rotation| over training iterations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr

    angles = data.extras["training_angle"].cpu().numpy()
    labels = data.training_targets.cpu().numpy()
    inputs = data.training_inputs
    final = example_weights(teacher, teacher_params, inputs, 1.0, curriculum).cpu().numpy()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, colour in ((0, "tab:blue"), (1, "tab:orange")):
        chosen = labels == label
        axis.scatter(angles[chosen], final[chosen], s=8, alpha=0.6, color=colour, label=f"class {label}")
    axis.set(xlabel="rotation (degrees)", ylabel="teacher weight at end of training",
             title=f"{data.name}: learned example weights")
    axis.legend()
    save_figure(figure, context, "weight_vs_rotation", step)

    progress = torch.linspace(0, 1, 21).numpy()
    correlations = [float(spearmanr(example_weights(teacher, teacher_params, inputs, float(p), curriculum)
                                    .cpu().numpy(), abs(angles)).statistic) for p in progress]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(progress, correlations, marker="o")
    axis.axhline(0, color="grey", lw=0.8)
    axis.set(xlabel="normalised training iteration", ylabel="Spearman ρ(weight, |rotation|)",
             title="curriculum: rank correlation over training", ylim=(-1.05, 1.05))
    save_figure(figure, context, "rank_correlation_over_training", step)
    return {"Commentary/Rank_Correlation_Start": correlations[0], "Commentary/Rank_Correlation_End": correlations[-1]}


# ----------------------------------------------------------------------------
# Reuse: a frozen teacher weighting a fresh student's examples


class ExampleWeights(FrozenTeaching):
    """Weighted mini-batch losses from a frozen teacher (``None``: unweighted)."""

    def __init__(self, teacher=None, curriculum=True):
        self.teacher, self.curriculum = teacher, curriculum
        self.params = None if teacher is None else dict(teacher.named_parameters())

    def loss(self, model, x, y, progress):
        if self.teacher is None:
            return F.cross_entropy(model(x), y)
        with torch.no_grad():
            weights = example_weights(self.teacher, self.params, x, progress, self.curriculum)
        return weighted_loss(model(x), y, weights)


# ----------------------------------------------------------------------------
# The registered method


@TEACHERS.register("ExampleWeighting")
class ExampleWeighting(PureTeachingMethod):
    """Learn an example-weighting teacher (``commentary: learned``) or skip it
    (``commentary: none``: the unweighted baseline), then train fresh students
    of each ``evaluation_students`` architecture with it and report their
    final metrics; ``objective`` is their mean final validation loss. One
    outer step is one teacher step (a fresh student's ``inner_steps``)."""

    def __init__(self, *, context, data=None, commentary="learned", curriculum=True, teacher_steps=200,
                 teacher_lr=0.01, teacher_width=8, inner_steps=20, inner_lr=0.3, batch_size=32, student=None,
                 chunk_size=0, truncation=0, objective_seeds=4, evaluation_students=None, evaluation_steps=None,
                 evaluation_lr=None, evaluation_optimiser="SGD", log_interval=10):
        self.learned = check_choice(commentary, "commentary", ("learned", "none")) == "learned"
        self.curriculum = check_bool(curriculum, "curriculum")
        self.steps = check_int(teacher_steps, "teacher_steps", 0) * self.learned
        self.teacher_lr = check_float(teacher_lr, "teacher_lr", 0.0)
        self.teacher_width = check_int(teacher_width, "teacher_width", 1)
        self.inner_steps = check_int(inner_steps, "inner_steps", 1)
        self.inner_lr = check_float(inner_lr, "inner_lr", 0.0, strict_minimum=True)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.chunk_size = check_int(chunk_size, "chunk_size", 0)
        self.truncation = check_int(truncation, "truncation", 0)
        self.objective_seeds = range(check_int(objective_seeds, "objective_seeds", 1))
        self.log_interval = check_int(log_interval, "log_interval", 1)
        self.evaluation_students, self.evaluation = evaluation_options(
            evaluation_students or [{"class": "CNN"}, {"class": "MLP"}],
            steps=check_int(evaluation_steps or inner_steps, "evaluation_steps", 1),
            lr=check_float(evaluation_lr or inner_lr, "evaluation_lr", 0.0, strict_minimum=True),
            optimiser=check_choice(evaluation_optimiser, "evaluation_optimiser", ("Adam", "SGD")),
            batch_size=batch_size, log_interval=log_interval)
        self.student_spec = student or {"class": "MLP", "hidden": [32]}
        self.use_data(data, context)
        self.record = {}

    def make_student(self):
        return build_student(self.student_spec, self.data, "teaching.student")

    def setup(self):
        self.generator = torch.Generator().manual_seed(self.context.seed)
        self.teacher = None
        if self.learned:
            self.teacher = build_teacher(self.data.input_shape, self.curriculum, self.teacher_width)
            self.teacher = self.teacher.to(self.context.device)
            self.student = self.make_student().to(self.context.device)
            self.problem = Problem(self.data, self.teacher, self.student, curriculum=self.curriculum,
                                   inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                                   batch_size=self.batch_size, student_factory=self.make_student)
            self.outer_optimiser = optimisers.HYPERPARAMETER_OPTIMISERS.get("Adam")(lr=self.teacher_lr)
            teacher = {name: p.detach().clone() for name, p in self.teacher.named_parameters()}
            self.state = {"teacher": teacher, "optimiser": self.outer_optimiser.init(teacher)}

    def begin(self):
        if self.learned:
            self.record["objective_initial"] = self.problem.objective(self.state["teacher"], self.objective_seeds,
                                                                      self.context.device)

    def checkpointed(self):
        if not self.learned:
            return {}
        return {"state": self.state, "generator": self.generator, "record": self.record}

    def outer_state(self):
        return self.state

    def load_outer_state(self, state):
        self.state = state

    def outer_inputs(self, step):
        """A fresh student and its ``K`` batches, from the run's generator."""
        student = reset_weights(self.student, self.generator, device=self.context.device)
        return {"student": student, "batches": self.problem.sample_batches(self.generator)}

    def pure_outer_step(self, state, inputs):
        """One teacher step: Adam on ``∂L_V/∂teacher`` through the fresh student's ``K`` steps."""
        result = self.problem.hypergradient(inputs["student"], state["teacher"], inputs["batches"],
                                            self.chunk_size, self.truncation)
        teacher, optimiser = self.outer_optimiser.update(state["teacher"], result.gradient, state["optimiser"])
        return {"teacher": teacher, "optimiser": optimiser}, {"Loss/Validation": result.value}

    def finish(self, steps_done):
        teaching = dict(self.record)
        if self.learned:
            with torch.no_grad():  # the teacher module (saved, reused) takes the learned values
                for name, parameter in self.teacher.named_parameters():
                    parameter.copy_(self.state["teacher"][name])
            teaching["objective_learned"] = self.problem.objective(self.state["teacher"], self.objective_seeds,
                                                                   self.context.device)
            self.context.tracker.scalar("Commentary/Objective_Initial", teaching["objective_initial"], steps_done)
            self.context.tracker.scalar("Commentary/Objective_Learned", teaching["objective_learned"], steps_done)
            if "training_angle" in self.data.extras:
                teaching.update(plot_weights(self.teacher, self.state["teacher"], self.data, self.curriculum, self.context,
                                             steps_done))
        final = train_students(self.evaluation_students, self.data, ExampleWeights(self.teacher, self.curriculum),
                               self.evaluation, self.context, evaluation_generator(self.context.seed))
        return {"final": final, "teaching": teaching}

    def export(self):
        if not self.learned:
            return None
        return {"tensors": self.teacher.state_dict(), "dataset": self.data_spec,
                "learned_by": {"algorithm": "unrolled (Algorithm 1)", "teacher_steps": self.steps,
                               "inner_steps": self.inner_steps, "chunk_size": self.chunk_size,
                               "truncation": self.truncation, "seed": self.context.seed},
                "config": {"curriculum": self.curriculum, "teacher_lr": self.teacher_lr, "inner_lr": self.inner_lr,
                           "batch_size": self.batch_size, "student": self.student_spec},
                "teacher": {"curriculum": self.curriculum, "width": self.teacher_width}}

    @classmethod
    def frozen_teaching(cls, payload, data, device):
        spec = payload["teacher"]
        teacher = build_teacher(data.input_shape, spec["curriculum"], spec["width"]).to(device)
        teacher.load_state_dict(payload["tensors"])
        return ExampleWeights(teacher, spec["curriculum"])
