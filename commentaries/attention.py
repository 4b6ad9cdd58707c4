"""Attention-mask commentaries (Raghu et al. 2021, Section 4.3), learned by
implicit differentiation (Algorithm 2).

A teacher maps an image to a spatial probability map (a softmax over pixels);
the map's mean position is the centre of a Gaussian mask of fixed width
``sigma`` and the student sees ``image * mask``, at training *and* test time.
Because validation images are masked too, the hypergradient has a direct term
``∂L_V/∂θ`` besides the implicit one through the student's weights.

Data: coloured digits (two digits in random quadrants, one red, one blue;
label = the red digit), where a good mask finds the red digit.
Baselines (``masks:``): ``random`` centres drawn uniformly per image,
``permuted`` (the learned masks of a batch assigned to other images),
``none`` (the unmasked image).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from commentaries import TEACHERS
from commentaries import storage
from commentaries.common import (
    RunningMean, build_student, check_choice, check_float, check_int, check_list, evaluation_generator,
    fresh_weights, implicit_hypergradient, log_interval_losses, log_scalars, mean_metrics, progress_bar,
    save_figure, set_grads, train_student)
from commentaries.data import build_data

KIND = "attention"
MASKS = ("learned", "random", "permuted", "none")


# ----------------------------------------------------------------------------
# Teacher and masks


def build_teacher(in_channels, width=16):
    """Fully convolutional: a logit per pixel (5×5 receptive field, enough to
    tell a red stroke from a blue one)."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))


def mask_centres(teacher, teacher_params, x):
    """Mean (row, column) of the teacher's probability map, in pixels."""
    logits = functional_call(teacher, teacher_params, (x,)).flatten(1)
    probabilities = torch.softmax(logits, dim=-1).view(len(x), *x.shape[-2:])
    rows = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype)
    cols = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)
    return torch.stack([(probabilities.sum(2) * rows).sum(1), (probabilities.sum(1) * cols).sum(1)], -1)


def gaussian_masks(centres, height, width, sigma):
    """``exp(-|p - c|² / 2σ²)`` on the pixel grid, one N×1×H×W mask per centre."""
    rows = torch.arange(height, device=centres.device, dtype=centres.dtype)
    cols = torch.arange(width, device=centres.device, dtype=centres.dtype)
    squared = ((rows[None, :, None] - centres[:, 0, None, None]) ** 2
               + (cols[None, None, :] - centres[:, 1, None, None]) ** 2)
    return torch.exp(-squared / (2 * sigma ** 2))[:, None]


def random_centres(count, height, width, device, generator=None):
    """The random-centre baseline: uniform over the image."""
    uniform = torch.rand(count, 2, generator=generator).to(device)
    return uniform * torch.tensor([height - 1.0, width - 1.0], device=device)


class Masker:
    """Applies a frozen mask policy (``learned``/``random``/``permuted``/``none``)."""

    def __init__(self, kind, teacher=None, teacher_params=None, sigma=3.0):
        self.kind, self.teacher, self.params, self.sigma = kind, teacher, teacher_params, sigma

    @torch.no_grad()
    def centres(self, x):
        height, width = x.shape[-2:]
        if self.kind == "random":
            return random_centres(len(x), height, width, x.device)
        centres = mask_centres(self.teacher, self.params, x)
        if self.kind == "permuted":
            centres = centres[torch.randperm(len(x), device=x.device)]
        return centres

    def __call__(self, x):
        if self.kind == "none":
            return x
        return x * gaussian_masks(self.centres(x), *x.shape[-2:], self.sigma)


# ----------------------------------------------------------------------------
# Learning the teacher jointly with a student (Algorithm 2)


def masked_loss(student, weights, teacher, hyper, names, x, y, sigma):
    params = dict(zip(names, hyper))
    masked = x * gaussian_masks(mask_centres(teacher, params, x), *x.shape[-2:], sigma)
    return F.cross_entropy(functional_call(student, weights, (masked,)), y)


def learn_teacher(teacher, data, student_spec, *, steps, lr, teacher_lr, batch_size, hyper_every, neumann_steps,
                  neumann_lr, sigma, validation_batch, generator, context, log_interval):
    device = data.train_x.device
    student = build_student(student_spec, "teaching.student", **data.shape()).to(device)
    weights = fresh_weights(student, device)
    params = dict(teacher.named_parameters())
    names, hyper = list(params), tuple(params.values())
    inner = torch.optim.Adam(weights.values(), lr=lr)
    outer = torch.optim.Adam(hyper, lr=teacher_lr)
    running = RunningMean(device)
    with progress_bar(steps, context, "attention teacher (Algorithm 2)") as bar:
        for step in range(steps):
            indices = torch.randint(0, len(data.train_x), (batch_size,), generator=generator).to(device)
            x, y = data.train_x[indices], data.train_y[indices]
            training_loss = lambda w, h: masked_loss(student, w, teacher, h, names, x, y, sigma)  # noqa: E731
            loss = training_loss(weights, hyper)
            inner.zero_grad(set_to_none=True)
            loss.backward(inputs=list(weights.values()))
            inner.step()
            if (step + 1) % hyper_every == 0:
                val_indices = torch.randint(0, len(data.val_x), (validation_batch,), generator=generator).to(device)
                vx, vy = data.val_x[val_indices], data.val_y[val_indices]
                validation_loss = lambda w, h: masked_loss(student, w, teacher, h, names, vx, vy, sigma)  # noqa: E731
                val, hypergrad = implicit_hypergradient(training_loss, validation_loss, weights, hyper,
                                                        neumann_steps, neumann_lr)
                set_grads(hyper, hypergrad)
                outer.step()
                running.add(val)
            bar.update()
            if (step + 1) % log_interval == 0 or step + 1 == steps:
                log_interval_losses(context.writer, loss, running, step + 1)
    return teacher


# ----------------------------------------------------------------------------
# Evaluation, objective, plot, reuse


def evaluate_masks(masker, data, student_specs, options, context, generator, prefix="Evaluation"):
    """Train fresh students on masked images (masked at test time too)."""
    results = []
    for spec in student_specs:
        name = spec["class"] if isinstance(spec, dict) else str(spec)
        model = build_student(spec, "teaching.evaluation_students", **data.shape()).to(context.device)
        batch_loss = lambda m, x, y, progress, indices: F.cross_entropy(m(masker(x)), y)  # noqa: E731
        results.append(train_student(model, data, batch_loss, lambda m, x: m(masker(x)), generator=generator,
                                     context=context, prefix=f"{prefix}/{name}/", description=f"student {name}",
                                     **options))
    return mean_metrics(results)


def mask_objective(masker, data, student_spec, options, seeds, context):
    """Validation loss of fresh students trained with the frozen masks from
    fixed seeds: the objective the teacher is trained to lower."""
    quiet = type("Quiet", (), {"writer": None, "progress": False, "device": context.device})()
    losses = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            metrics = evaluate_masks(masker, data, [student_spec], options, quiet,
                                     torch.Generator().manual_seed(20_000 + seed))
        losses.append(metrics["Loss/Validation"])
    return sum(losses) / len(losses)


@torch.no_grad()
def plot_masks(masker, data, context, step, count=8):
    """Validation images, their masks (as the policy gives them: learned,
    random or permuted) and the masked images the student sees."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = data.val_x[:count]
    centres = masker.centres(x)
    masks = gaussian_masks(centres, *x.shape[-2:], masker.sigma).cpu().numpy()
    centres = centres.cpu().numpy()
    images = x.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()
    figure, axes = plt.subplots(3, count, figsize=(1.4 * count, 4.6))
    for i in range(count):
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(f"label {int(data.val_y[i])}", fontsize=8)
        axes[1, i].imshow(masks[i, 0], cmap="gray", vmin=0, vmax=1)
        axes[1, i].plot(centres[i, 1], centres[i, 0], "r+", markersize=8)
        axes[2, i].imshow(images[i] * masks[i, 0][:, :, None])
        for row in range(3):
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
    for row, label in enumerate(("image", "mask", "masked")):
        axes[row, 0].set_ylabel(label)
    figure.suptitle(f"{masker.kind} attention masks (label = red digit)")
    save_figure(figure, context, "attention_masks", step)


def red_quadrant_hit_rate(teacher, params, data):
    """Fraction of test images whose mask centre lies in the red digit's quadrant."""
    with torch.no_grad():
        centres = mask_centres(teacher, params, data.test_x)
    half = torch.tensor(data.test_x.shape[-2:], device=centres.device) / 2
    quadrant = (centres[:, 0] >= half[0]).long() * 2 + (centres[:, 1] >= half[1]).long()
    return float((quadrant == data.extras["test_red_quadrant"]).float().mean())


def train_student_with_commentary(payload, data, student, options, context, generator):
    """Entry point of ``TrainWithCommentary`` for a saved attention teacher."""
    teacher = build_teacher(data.in_channels, payload["teacher"]["width"]).to(context.device)
    teacher.load_state_dict(payload["tensors"])
    masker = Masker("learned", teacher, dict(teacher.named_parameters()), payload["teacher"]["sigma"])
    return evaluate_masks(masker, data, [student or {"class": "CNN"}], options, context, generator, prefix="Student")


# ----------------------------------------------------------------------------
# The registered method


@TEACHERS.register("AttentionMasks")
def attention_masks(*, context, data=None, masks="learned", commentary=None, sigma=3.0, teacher_width=16,
                    student=None, steps=500, lr=0.001, teacher_lr=0.001, batch_size=64, hyper_every=1,
                    neumann_steps=1, neumann_lr=0.1, validation_batch=256, evaluation_students=None,
                    evaluation_steps=500, evaluation_lr=0.001, objective_seeds=1, log_interval=25):
    """Learn an attention teacher jointly with a student (Algorithm 2), unless
    ``commentary:`` names a saved one, and train fresh students with the
    chosen masks (``learned`` or a baseline); ``objective`` is their mean
    final validation loss."""
    check_choice(masks, "masks", MASKS)
    check_float(sigma, "sigma", 0.0, strict_minimum=True)
    for key, value in (("teacher_width", teacher_width), ("steps", steps), ("batch_size", batch_size),
                       ("hyper_every", hyper_every), ("neumann_steps", neumann_steps),
                       ("validation_batch", validation_batch), ("evaluation_steps", evaluation_steps),
                       ("objective_seeds", objective_seeds), ("log_interval", log_interval)):
        check_int(value, key, 1)
    for key, value in (("lr", lr), ("neumann_lr", neumann_lr), ("evaluation_lr", evaluation_lr)):
        check_float(value, key, 0.0, strict_minimum=True)
    check_float(teacher_lr, "teacher_lr", 0.0)
    evaluation_students = check_list(evaluation_students or [{"class": "CNN"}], "evaluation_students")

    device = context.device
    dataset = build_data(data).to(device)
    if dataset.in_channels != 3:
        raise ValueError(f"attention masks need colour images; {dataset.name} has {dataset.in_channels} channel(s)")
    generator = torch.Generator().manual_seed(context.seed)
    student_spec = student or {"class": "CNN", "width": 16}
    evaluation = {"steps": evaluation_steps, "lr": evaluation_lr, "optimiser": "Adam", "batch_size": batch_size,
                  "log_interval": min(log_interval, evaluation_steps)}
    results = {"status": "finished", "dataset": dataset.name}
    teacher = params = None
    if masks in ("learned", "permuted"):
        if commentary is not None:
            payload = storage.load_commentary(commentary)
            if payload["kind"] != KIND:
                raise ValueError(f"commentary {commentary} is a {payload['kind']} commentary, not {KIND}")
            teacher = build_teacher(dataset.in_channels, payload["teacher"]["width"]).to(device)
            teacher.load_state_dict(payload["tensors"])
            sigma = payload["teacher"]["sigma"]
            params = dict(teacher.named_parameters())
        else:
            teacher = build_teacher(dataset.in_channels, teacher_width).to(device)
            params = dict(teacher.named_parameters())
            seeds = range(objective_seeds)
            initial = mask_objective(Masker("learned", teacher, params, sigma), dataset, student_spec, evaluation,
                                     seeds, context)
            initial_hits = red_quadrant_hit_rate(teacher, params, dataset)
            learn_teacher(teacher, dataset, student_spec, steps=steps, lr=lr, teacher_lr=teacher_lr,
                          batch_size=batch_size, hyper_every=hyper_every, neumann_steps=neumann_steps,
                          neumann_lr=neumann_lr, sigma=sigma, validation_batch=validation_batch,
                          generator=generator, context=context, log_interval=log_interval)
            learned = mask_objective(Masker("learned", teacher, params, sigma), dataset, student_spec, evaluation,
                                     seeds, context)
            results["teaching"] = {"objective_initial": initial, "objective_learned": learned,
                                   "red_quadrant_hits_initial": initial_hits,
                                   "red_quadrant_hits_learned": red_quadrant_hit_rate(teacher, params, dataset)}
            hits = results["teaching"]["red_quadrant_hits_learned"]
            log_scalars(context.writer, {"Commentary/Objective_Initial": initial,
                                         "Commentary/Objective_Learned": learned,
                                         "Commentary/Red_Quadrant_Hits": hits}, steps)
            path = storage.save_commentary(
                context.run_dir / "commentary.pt", kind=KIND, tensors=teacher.state_dict(), dataset=dataset.spec,
                learned_by={"algorithm": "implicit (Algorithm 2)", "steps": steps, "neumann_steps": neumann_steps,
                            "seed": context.seed},
                config={"teacher_lr": teacher_lr, "lr": lr, "batch_size": batch_size, "student": student_spec},
                teacher={"width": teacher_width, "sigma": sigma})
            results["commentary_file"] = str(path)
    masker = Masker(masks, teacher, params, sigma)
    if masks != "none":
        plot_masks(masker, dataset, context, steps)
    final = evaluate_masks(masker, dataset, evaluation_students, evaluation, context,
                           evaluation_generator(context.seed))
    results.update(final=final, objective=final["Loss/Validation"])
    return results
