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

Long unrolls are memory-bounded with ``chunk_size`` (exact checkpointing) or
``truncation`` (last steps only); see :func:`common.unrolled_hypergradient`.
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call

from commentaries import TEACHERS
from commentaries import storage
from commentaries.common import (
    RunningMean, build_student, check_bool, check_choice, check_float, check_int, check_list, cnn,
    evaluation_generator, fresh_weights, log_scalars, mean_metrics, progress_bar, save_figure, set_grads,
    train_student, unrolled_hypergradient, _sgd_steps)
from commentaries.data import build_data

KIND = "example_weighting"


# ----------------------------------------------------------------------------
# The teacher and the weighted loss


def build_teacher(in_channels, image_size, curriculum=True, width=8, activation="ReLU"):
    """Two-block CNN with one output; input channels + 1 when ``curriculum``."""
    return cnn(in_channels=in_channels + int(curriculum), image_size=image_size, num_outputs=1, width=width,
               activation=activation)


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
        self.teacher_names = [name for name, _ in teacher.named_parameters()]

    def sample_batches(self, generator):
        """Mini-batch indices for all ``K`` inner steps, drawn up front so a
        checkpointed chunk recomputes exactly the steps that ran."""
        shape = (self.inner_steps, self.batch_size)
        return torch.randint(0, len(self.data.train_x), shape, generator=generator).to(self.data.train_x.device)

    def inner_loss(self, batches):
        def loss(weights, hyper, step):
            indices = batches[step]
            x, y = self.data.train_x[indices], self.data.train_y[indices]
            teacher_params = dict(zip(self.teacher_names, hyper))
            w = example_weights(self.teacher, teacher_params, x, step / self.inner_steps, self.curriculum)
            return weighted_loss(functional_call(self.student, weights, (x,)), y, w)
        return loss

    def outer_loss(self, weights, hyper):
        logits = functional_call(self.student, weights, (self.data.val_x,))
        return F.cross_entropy(logits, self.data.val_y)

    def hypergradient(self, student_weights, hyper, generator, chunk_size=0, truncation=0):
        batches = self.sample_batches(generator)
        return unrolled_hypergradient(self.inner_loss(batches), self.outer_loss, student_weights, hyper,
                                      self.inner_steps, self.inner_lr, chunk_size, truncation)

    def objective(self, hyper, seeds, device, dtype=torch.float32):
        """Mean validation loss after ``K`` weighted steps from fixed student
        initialisations and batches (one per seed): the quantity the teacher is
        trained to lower, evaluated reproducibly."""
        hyper = tuple(h.detach() for h in hyper)
        losses = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(10_000 + seed)
                weights = fresh_weights(self.student_factory(), device, dtype)
            batches = self.sample_batches(torch.Generator().manual_seed(20_000 + seed))
            final = _sgd_steps(self.inner_loss(batches), weights, hyper, range(self.inner_steps),
                               self.inner_lr, False)
            with torch.no_grad():
                losses.append(float(self.outer_loss(final, hyper)))
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

    angles = data.extras["train_angle"].cpu().numpy()
    labels = data.train_y.cpu().numpy()
    final = example_weights(teacher, teacher_params, data.train_x, 1.0, curriculum).cpu().numpy()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, colour in ((0, "tab:blue"), (1, "tab:orange")):
        chosen = labels == label
        axis.scatter(angles[chosen], final[chosen], s=8, alpha=0.6, color=colour, label=f"class {label}")
    axis.set(xlabel="rotation (degrees)", ylabel="teacher weight at end of training",
             title=f"{data.name}: learned example weights")
    axis.legend()
    save_figure(figure, context, "weight_vs_rotation", step)

    progress = torch.linspace(0, 1, 21).numpy()
    correlations = [float(spearmanr(example_weights(teacher, teacher_params, data.train_x, float(p), curriculum)
                                    .cpu().numpy(), abs(angles)).statistic) for p in progress]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(progress, correlations, marker="o")
    axis.axhline(0, color="grey", lw=0.8)
    axis.set(xlabel="normalised training iteration", ylabel="Spearman ρ(weight, |rotation|)",
             title="curriculum: rank correlation over training", ylim=(-1.05, 1.05))
    save_figure(figure, context, "rank_correlation_over_training", step)
    return {"Commentary/Rank_Correlation_Start": correlations[0], "Commentary/Rank_Correlation_End": correlations[-1]}


# ----------------------------------------------------------------------------
# Reuse: train a fresh student with a frozen teacher


def weighting_from_payload(payload, data, device):
    spec = payload["teacher"]
    teacher = build_teacher(data.in_channels, data.image_size, spec["curriculum"], spec["width"]).to(device)
    teacher.load_state_dict(payload["tensors"])
    return teacher, spec["curriculum"]


def evaluate_students(teacher, teacher_params, curriculum, data, student_specs, options, context, generator,
                      prefix="Evaluation"):
    """Train fresh students of each architecture with the frozen weighting
    (``teacher=None``: plain unweighted training) and log their curves."""
    results = []
    for spec in student_specs:
        name = spec["class"] if isinstance(spec, dict) else str(spec)
        model = build_student(spec, "teaching.evaluation_students", **data.shape()).to(context.device)

        def batch_loss(model, x, y, progress, indices):
            logits = model(x)
            if teacher is None:
                return F.cross_entropy(logits, y)
            with torch.no_grad():
                w = example_weights(teacher, teacher_params, x, progress, curriculum)
            return weighted_loss(logits, y, w)

        results.append(train_student(model, data, batch_loss, lambda m, x: m(x), generator=generator,
                                     context=context, prefix=f"{prefix}/{name}/", description=f"student {name}",
                                     **options))
    return mean_metrics(results)


def train_student_with_commentary(payload, data, student, options, context, generator):
    """Entry point of ``TrainWithCommentary`` for a saved example weighting."""
    teacher, curriculum = weighting_from_payload(payload, data, context.device)
    params = dict(teacher.named_parameters())
    return evaluate_students(teacher, params, curriculum, data, [student or {"class": "CNN"}], options,
                             context, generator, prefix="Student")


# ----------------------------------------------------------------------------
# The registered method


@TEACHERS.register("ExampleWeighting")
def example_weighting(*, context, data=None, commentary="learned", curriculum=True, teacher_steps=200,
                      teacher_lr=0.01, teacher_width=8, inner_steps=20, inner_lr=0.3, batch_size=32,
                      student=None, chunk_size=0, truncation=0, objective_seeds=4, evaluation_students=None,
                      evaluation_steps=None, evaluation_lr=None, evaluation_optimiser="SGD", log_interval=10):
    """Learn an example-weighting teacher (``commentary: learned``) or skip it
    (``commentary: none``: the unweighted baseline), then train fresh students
    of each ``evaluation_students`` architecture with it and report their
    final metrics; ``objective`` is their mean final validation loss."""
    check_choice(commentary, "commentary", ("learned", "none"))
    check_bool(curriculum, "curriculum")
    check_int(teacher_steps, "teacher_steps", 0)
    check_float(teacher_lr, "teacher_lr", 0.0)
    check_int(teacher_width, "teacher_width", 1)
    check_int(inner_steps, "inner_steps", 1)
    check_float(inner_lr, "inner_lr", 0.0, strict_minimum=True)
    check_int(batch_size, "batch_size", 1)
    check_int(chunk_size, "chunk_size", 0)
    check_int(truncation, "truncation", 0)
    check_int(objective_seeds, "objective_seeds", 1)
    check_int(log_interval, "log_interval", 1)
    evaluation_students = check_list(evaluation_students or [{"class": "CNN"}, {"class": "MLP"}],
                                     "evaluation_students")
    evaluation = {"steps": check_int(evaluation_steps or inner_steps, "evaluation_steps", 1),
                  "lr": check_float(evaluation_lr or inner_lr, "evaluation_lr", 0.0, strict_minimum=True),
                  "optimiser": check_choice(evaluation_optimiser, "evaluation_optimiser", ("Adam", "SGD")),
                  "batch_size": batch_size, "log_interval": max(1, min(log_interval, evaluation_steps or inner_steps))}

    device = context.device
    dataset = build_data(data).to(device)
    generator = torch.Generator().manual_seed(context.seed)
    results = {"status": "finished", "dataset": dataset.name}
    teacher = params = None
    if commentary == "learned":
        teacher = build_teacher(dataset.in_channels, dataset.image_size, curriculum, teacher_width).to(device)
        params = dict(teacher.named_parameters())
        student_spec = student or {"class": "MLP", "hidden": [32]}
        make_student = lambda: build_student(student_spec, "teaching.student", **dataset.shape())  # noqa: E731
        problem = Problem(dataset, teacher, make_student(), curriculum=curriculum, inner_steps=inner_steps,
                          inner_lr=inner_lr, batch_size=batch_size, student_factory=make_student)
        seeds = range(objective_seeds)
        initial = problem.objective(params.values(), seeds, device)
        optimiser = torch.optim.Adam(params.values(), lr=teacher_lr)
        running = RunningMean(device)
        with progress_bar(teacher_steps, context, "teacher (Algorithm 1)") as bar:
            for step in range(teacher_steps):
                weights = fresh_weights(make_student(), device)
                loss, _, grads = problem.hypergradient(weights, tuple(params.values()), generator,
                                                       chunk_size, truncation)
                set_grads(params.values(), grads)
                optimiser.step()
                running.add(loss)
                bar.update()
                if (step + 1) % log_interval == 0 or step + 1 == teacher_steps:
                    log_scalars(context.writer, {"Loss/Validation": running.pop()}, step + 1)
        learned = problem.objective(params.values(), seeds, device)
        results["teaching"] = {"objective_initial": initial, "objective_learned": learned}
        log_scalars(context.writer, {"Commentary/Objective_Initial": initial,
                                     "Commentary/Objective_Learned": learned}, teacher_steps)
        if "train_angle" in dataset.extras:
            correlations = plot_weights(teacher, params, dataset, curriculum, context, teacher_steps)
            results["teaching"].update(correlations)
        path = storage.save_commentary(
            context.run_dir / "commentary.pt", kind=KIND, tensors=teacher.state_dict(), dataset=dataset.spec,
            learned_by={"algorithm": "unrolled (Algorithm 1)", "teacher_steps": teacher_steps,
                        "inner_steps": inner_steps, "chunk_size": chunk_size, "truncation": truncation,
                        "seed": context.seed},
            config={"curriculum": curriculum, "teacher_lr": teacher_lr, "inner_lr": inner_lr,
                    "batch_size": batch_size, "student": student_spec},
            teacher={"curriculum": curriculum, "width": teacher_width})
        results["commentary_file"] = str(path)
    final = evaluate_students(teacher, params, curriculum, dataset, evaluation_students, evaluation, context,
                              evaluation_generator(context.seed))
    results.update(final=final, objective=final["Loss/Validation"])
    return results
