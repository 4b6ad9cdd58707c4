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
import torch
import torch.nn.functional as F
from torch.func import functional_call

from commentaries import TEACHERS
from commentaries import storage
from commentaries.common import (
    RunningMean, build_student, check_choice, check_float, check_int, check_list, evaluation_generator,
    fresh_weights, implicit_hypergradient, log_interval_losses, log_scalars, mean_metrics, progress_bar,
    save_figure, set_grads, soft_cross_entropy, train_student, unrolled_hypergradient, _sgd_steps)
from commentaries.data import build_data

KIND = "augmentation"
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


class Policy:
    """A frozen augmentation policy: how λ is drawn for a batch."""

    def __init__(self, kind, proportions=None, mixup_alpha=1.0):
        self.kind, self.proportions, self.mixup_alpha = kind, proportions, mixup_alpha

    def sample(self, y, partner):
        if self.kind == "none":
            return torch.ones(len(y), device=y.device)
        if self.kind == "mixup":
            return mixup_proportions(len(y), self.mixup_alpha, y.device)
        return self.proportions[y, y[partner]]

    def loss(self, model, x, y, num_classes):
        if self.kind == "none":
            return F.cross_entropy(model(x), y)
        partner = torch.randperm(len(y), device=y.device)
        mixed_x, mixed_y = blend(x, y, self.sample(y, partner), partner, num_classes)
        return soft_cross_entropy(model(mixed_x), mixed_y).mean()


# ----------------------------------------------------------------------------
# Learning the grid


def learn_implicit(grid, data, student_spec, *, steps, lr, batch_size, grid_lr, hyper_every, neumann_steps,
                   neumann_lr, generator, context, log_interval):
    """Algorithm 2: one student trained with Adam on blended batches; every
    ``hyper_every`` steps the grid takes an Adam step along the implicit
    hypergradient of the full validation loss at the current weights."""
    device, n = data.train_x.device, data.num_classes
    student = build_student(student_spec, "teaching.student", **data.shape()).to(device)
    weights = fresh_weights(student, device)
    inner = torch.optim.Adam(weights.values(), lr=lr)
    outer = torch.optim.Adam([grid], lr=grid_lr)
    call = lambda w: lambda inputs: functional_call(student, w, (inputs,))  # noqa: E731
    running = RunningMean(device)
    with progress_bar(steps, context, "augmentation (Algorithm 2)") as bar:
        for step in range(steps):
            indices = torch.randint(0, len(data.train_x), (batch_size,), generator=generator).to(device)
            x, y = data.train_x[indices], data.train_y[indices]
            partner = torch.randperm(batch_size, generator=generator).to(device)
            training_loss = lambda w, hyper: grid_loss(call(w), hyper[0], x, y, partner, n)  # noqa: E731
            loss = training_loss(weights, (grid,))
            inner.zero_grad(set_to_none=True)
            loss.backward(inputs=list(weights.values()))
            inner.step()
            if (step + 1) % hyper_every == 0:
                validation_loss = lambda w, hyper: F.cross_entropy(call(w)(data.val_x), data.val_y)  # noqa: E731
                val, (hypergrad,) = implicit_hypergradient(training_loss, validation_loss, weights, (grid,),
                                                           neumann_steps, neumann_lr)
                set_grads([grid], [hypergrad])
                outer.step()
                running.add(val)
            bar.update()
            if (step + 1) % log_interval == 0 or step + 1 == steps:
                log_interval_losses(context.writer, loss, running, step + 1)
    return grid


def learn_unrolled(grid, data, student_spec, *, teacher_steps, inner_steps, inner_lr, batch_size, grid_lr,
                   chunk_size, generator, context, log_interval):
    """Algorithm 1 for small cases: for each grid step a fresh student takes
    ``inner_steps`` SGD steps on blended batches; its validation loss is
    backpropagated through them into the grid."""
    device = data.train_x.device
    student = build_student(student_spec, "teaching.student", **data.shape()).to(device)
    outer = torch.optim.Adam([grid], lr=grid_lr)
    running = RunningMean(device)
    with progress_bar(teacher_steps, context, "augmentation (Algorithm 1)") as bar:
        for step in range(teacher_steps):
            fresh = build_student(student_spec, "teaching.student", **data.shape()).to(device)
            inner_loss, outer_loss = unrolled_losses(student, data, batch_size, inner_steps, generator)
            val, _, (hypergrad,) = unrolled_hypergradient(inner_loss, outer_loss, fresh_weights(fresh, device),
                                                          (grid,), inner_steps, inner_lr, chunk_size)
            set_grads([grid], [hypergrad])
            outer.step()
            running.add(val)
            bar.update()
            if (step + 1) % log_interval == 0 or step + 1 == teacher_steps:
                log_scalars(context.writer, {"Loss/Validation": running.pop()}, step + 1)
    return grid


def unrolled_losses(student, data, batch_size, inner_steps, generator):
    """Inner (blended) and outer (validation) losses with every step's batch and
    pairing drawn up front, for :func:`common.unrolled_hypergradient`."""
    device, n = data.train_x.device, data.num_classes
    batches = torch.randint(0, len(data.train_x), (inner_steps, batch_size), generator=generator).to(device)
    partners = torch.stack([torch.randperm(batch_size, generator=generator) for _ in range(inner_steps)]).to(device)

    def inner_loss(weights, hyper, step):
        x, y = data.train_x[batches[step]], data.train_y[batches[step]]
        return grid_loss(lambda inputs: functional_call(student, weights, (inputs,)), hyper[0], x, y,
                         partners[step], n)

    def outer_loss(weights, hyper):
        return F.cross_entropy(functional_call(student, weights, (data.val_x,)), data.val_y)

    return inner_loss, outer_loss


def unrolled_objective(grid, data, student_spec, *, inner_steps, inner_lr, batch_size, seeds):
    """Validation loss after ``inner_steps`` blended SGD steps from fixed
    student initialisations and batches: what Algorithm 1 lowers."""
    losses = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            fresh = build_student(student_spec, "teaching.student", **data.shape()).to(data.train_x.device)
        inner_loss, outer_loss = unrolled_losses(fresh, data, batch_size, inner_steps,
                                                 torch.Generator().manual_seed(20_000 + seed))
        final = _sgd_steps(inner_loss, fresh_weights(fresh, data.train_x.device), (grid.detach(),),
                           range(inner_steps), inner_lr, False)
        with torch.no_grad():
            losses.append(float(outer_loss(final, None)))
    return sum(losses) / len(losses)


def policy_objective(proportions, data, student_spec, seeds, context, *, steps, lr, batch_size):
    """Validation loss of fresh students trained with the frozen grid as
    Algorithm 2 trains its student (Adam, ``steps`` steps) from fixed seeds:
    the objective the jointly learned grid is meant to lower."""
    quiet = type("Quiet", (), {"writer": None, "progress": False, "device": context.device})()
    options = {"steps": steps, "lr": lr, "batch_size": batch_size, "optimiser": "Adam", "log_interval": steps}
    losses = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            metrics = evaluate_policy(Policy("learned", proportions), data, [student_spec], options, quiet,
                                      torch.Generator().manual_seed(20_000 + seed))
        losses.append(metrics["Loss/Validation"])
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------
# Plot and reuse


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


def evaluate_policy(policy, data, student_specs, options, context, generator, prefix="Evaluation"):
    """Train fresh students with a frozen policy; mean final metrics."""
    results = []
    for spec in student_specs:
        name = spec["class"] if isinstance(spec, dict) else str(spec)
        model = build_student(spec, "teaching.evaluation_students", **data.shape()).to(context.device)
        batch_loss = lambda m, x, y, progress, indices: policy.loss(m, x, y, data.num_classes)  # noqa: E731
        results.append(train_student(model, data, batch_loss, lambda m, x: m(x), generator=generator,
                                     context=context, prefix=f"{prefix}/{name}/", description=f"student {name}",
                                     **options))
    return mean_metrics(results)


def train_student_with_commentary(payload, data, student, options, context, generator):
    """Entry point of ``TrainWithCommentary`` for a saved augmentation policy."""
    proportions = payload["tensors"]["proportions"].to(context.device)
    if proportions.shape != (data.num_classes, data.num_classes):
        raise ValueError(f"the saved grid is {tuple(proportions.shape)}, the data has {data.num_classes} classes")
    policy = Policy(payload["config"].get("policy", "learned"), proportions)
    return evaluate_policy(policy, data, [student or {"class": "CNN"}], options, context, generator,
                           prefix="Student")


# ----------------------------------------------------------------------------
# The registered method


@TEACHERS.register("Augmentation")
def augmentation(*, context, data=None, policy="learned", method="implicit", commentary=None, student=None,
                 steps=500, lr=0.001, batch_size=64, grid_lr=0.05, hyper_every=1, neumann_steps=1,
                 neumann_lr=0.1, teacher_steps=50, inner_steps=10, inner_lr=0.3, chunk_size=0, mixup_alpha=1.0,
                 evaluation_students=None, evaluation_steps=500, evaluation_lr=0.001, objective_seeds=2,
                 log_interval=25):
    """Learn a label-pair blending grid (``policy: learned`` or ``shuffled``,
    unless ``commentary:`` names a saved one) or build a baseline policy, then
    train fresh students with it; ``objective`` is their mean final
    validation loss."""
    check_choice(policy, "policy", POLICIES)
    check_choice(method, "method", ("implicit", "unrolled"))
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
    evaluation_students = check_list(evaluation_students or [{"class": "CNN"}], "evaluation_students")

    device = context.device
    dataset = build_data(data).to(device)
    generator = torch.Generator().manual_seed(context.seed)
    n = dataset.num_classes
    student_spec = student or {"class": "CNN", "width": 16}
    results = {"status": "finished", "dataset": dataset.name}
    proportions = None
    if policy in ("learned", "shuffled"):
        if commentary is not None:
            payload = storage.load_commentary(commentary)
            if payload["kind"] != KIND:
                raise ValueError(f"commentary {commentary} is a {payload['kind']} commentary, not {KIND}")
            proportions = payload["tensors"]["proportions"].to(device)
        else:
            options = {"steps": steps, "lr": lr, "batch_size": batch_size, "grid_lr": grid_lr,
                       "hyper_every": hyper_every, "neumann_steps": neumann_steps, "neumann_lr": neumann_lr,
                       "teacher_steps": teacher_steps, "inner_steps": inner_steps, "inner_lr": inner_lr,
                       "chunk_size": chunk_size, "objective_seeds": objective_seeds, "log_interval": log_interval}
            proportions = learn_grid(dataset, student_spec, method, options, generator, context, results)
        if policy == "shuffled":
            proportions = shuffle_grid(proportions, generator)
    elif policy == "random":
        proportions = random_proportions(n, generator).to(device)
    if proportions is not None:
        plot_proportions(proportions, f"{dataset.name}: {policy} blending proportions λ", context, steps)
        if "commentary_file" not in results and commentary is None:
            path = storage.save_commentary(
                context.run_dir / "commentary.pt", kind=KIND, tensors={"proportions": proportions},
                dataset=dataset.spec, config={"policy": policy, "student": student_spec},
                learned_by=results.get("learned_by", {"algorithm": policy}))
            results["commentary_file"] = str(path)
    evaluation = {"steps": evaluation_steps, "lr": evaluation_lr, "optimiser": "Adam", "batch_size": batch_size,
                  "log_interval": min(log_interval, evaluation_steps)}
    final = evaluate_policy(Policy(policy, proportions, mixup_alpha), dataset, evaluation_students, evaluation,
                            context, evaluation_generator(context.seed))
    results.update(final=final, objective=final["Loss/Validation"])
    return results


def learn_grid(dataset, student_spec, method, options, generator, context, results):
    """Learn φ (initialised at 0, i.e. λ = 0.75) by the chosen route; record the
    objective it lowers before and after, and how it was learned."""
    n, device = dataset.num_classes, context.device
    grid = torch.zeros(n, n, device=device, requires_grad=True)
    seeds = range(options["objective_seeds"])
    if method == "implicit":
        def objective():
            return policy_objective(proportions_from_grid(grid.detach()), dataset, student_spec, seeds, context,
                                    steps=options["steps"], lr=options["lr"], batch_size=options["batch_size"])
    else:
        def objective():
            return unrolled_objective(grid, dataset, student_spec, inner_steps=options["inner_steps"],
                                      inner_lr=options["inner_lr"], batch_size=options["batch_size"], seeds=seeds)
    initial = objective()
    if method == "implicit":
        learn_implicit(grid, dataset, student_spec, steps=options["steps"], lr=options["lr"],
                       batch_size=options["batch_size"], grid_lr=options["grid_lr"],
                       hyper_every=options["hyper_every"], neumann_steps=options["neumann_steps"],
                       neumann_lr=options["neumann_lr"], generator=generator, context=context,
                       log_interval=options["log_interval"])
        results["learned_by"] = {"algorithm": "implicit (Algorithm 2)", "steps": options["steps"],
                                 "neumann_steps": options["neumann_steps"], "seed": context.seed}
    else:
        learn_unrolled(grid, dataset, student_spec, teacher_steps=options["teacher_steps"],
                       inner_steps=options["inner_steps"], inner_lr=options["inner_lr"],
                       batch_size=options["batch_size"], grid_lr=options["grid_lr"],
                       chunk_size=options["chunk_size"], generator=generator, context=context,
                       log_interval=options["log_interval"])
        results["learned_by"] = {"algorithm": "unrolled (Algorithm 1)", "teacher_steps": options["teacher_steps"],
                                 "inner_steps": options["inner_steps"], "seed": context.seed}
    learned = objective()
    results["teaching"] = {"objective_initial": initial, "objective_learned": learned}
    log_scalars(context.writer, {"Commentary/Objective_Initial": initial, "Commentary/Objective_Learned": learned},
                options["steps"])
    grid = grid.detach()
    if results.get("learned_by"):
        path = storage.save_commentary(
            context.run_dir / "commentary.pt", kind=KIND,
            tensors={"grid": grid, "proportions": proportions_from_grid(grid)}, dataset=dataset.spec,
            learned_by=results["learned_by"], config={"policy": "learned", "method": method, "student": student_spec})
        results["commentary_file"] = str(path)
    return proportions_from_grid(grid)
