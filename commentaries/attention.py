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
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import linear_solvers
from commentaries import TEACHERS, storage
from commentaries.common import (
    FrozenTeaching, build_student, check_choice, check_float, check_int, evaluation_generator, evaluation_options,
    fresh_weights, save_figure, set_grads, train_students)
from commentaries.loop import TeachingMethod
from hypergradients import gradient_step, implicit

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


class Masker(FrozenTeaching):
    """Applies a frozen mask policy (``learned``/``random``/``permuted``/``none``)
    to the images a student sees, in training and at test time."""

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

    def loss(self, model, x, y, progress):
        return F.cross_entropy(model(self(x)), y)

    def predict(self, model, x):
        return model(self(x))


# ----------------------------------------------------------------------------
# Learning the teacher jointly with a student (Algorithm 2)


def masked_loss(student, weights, teacher, params, x, y, sigma):
    """The student's cross-entropy on images masked by the teacher (``params``):
    a function of both, for the hypergradient's training and validation losses."""
    masked = x * gaussian_masks(mask_centres(teacher, params, x), *x.shape[-2:], sigma)
    return F.cross_entropy(functional_call(student, weights, (masked,)), y)


def mask_hypergradient(student, teacher, sigma, weights, params, batch, validation, lr, neumann_steps):
    """Algorithm 2's teacher gradient at the current student weights: the
    implicit hypergradient of the masked validation loss through the SGD map
    ``w - lr ∇_w L_T(w, θ)`` of the masked training loss, plus its direct
    term ``∂L_V/∂θ`` (validation images are masked too).
    Returns :class:`hypergradients.Hypergradient` (``value``: ``L_V``)."""
    def training_loss(weights, params):
        return masked_loss(student, weights, teacher, params, *batch, sigma)

    def validation_loss(weights, params):
        return masked_loss(student, weights, teacher, params, *validation, sigma)

    detached = lambda tree: {name: t.detach() for name, t in tree.items()}  # noqa: E731
    return implicit(gradient_step(training_loss, lr), validation_loss, detached(weights), detached(params),
                    solve=linear_solvers.neumann, iterations=neumann_steps)


def mask_objective(masker, data, student_spec, options, seeds, device):
    """Validation loss of fresh students trained with the frozen masks from
    fixed seeds: the objective the teacher is trained to lower."""
    quiet = types.SimpleNamespace(tracker=None, device=device)
    losses = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            metrics = train_students([student_spec], data, masker, options, quiet,
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

    x = data.validation_inputs[:count]
    centres = masker.centres(x)
    masks = gaussian_masks(centres, *x.shape[-2:], masker.sigma).cpu().numpy()
    centres = centres.cpu().numpy()
    images = x.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()
    figure, axes = plt.subplots(3, count, figsize=(1.4 * count, 4.6))
    for i in range(count):
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(f"label {int(data.validation_targets[i])}", fontsize=8)
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
        centres = mask_centres(teacher, params, data.test_inputs)
    half = torch.tensor(data.test_inputs.shape[-2:], device=centres.device) / 2
    quadrant = (centres[:, 0] >= half[0]).long() * 2 + (centres[:, 1] >= half[1]).long()
    return float((quadrant == data.extras["test_red_quadrant"]).float().mean())


# ----------------------------------------------------------------------------
# The registered method


@TEACHERS.register("AttentionMasks")
class AttentionMasks(TeachingMethod):
    """Learn an attention teacher jointly with a student (Algorithm 2), unless
    ``commentary:`` names a saved one, and train fresh students with the
    chosen masks (``learned`` or a baseline); ``objective`` is their mean
    final validation loss. One outer step is one Adam step of the student on
    masked images and, every ``hyper_every`` steps, a teacher step along the
    implicit hypergradient of a masked validation batch's loss."""

    def __init__(self, *, context, data=None, masks="learned", commentary=None, sigma=3.0, teacher_width=16,
                 student=None, steps=500, lr=0.001, teacher_lr=0.001, batch_size=64, hyper_every=1,
                 neumann_steps=1, neumann_lr=0.1, validation_batch=256, evaluation_students=None,
                 evaluation_steps=500, evaluation_lr=0.001, objective_seeds=1, log_interval=25):
        self.masks = check_choice(masks, "masks", MASKS)
        self.sigma = check_float(sigma, "sigma", 0.0, strict_minimum=True)
        for key, value in (("teacher_width", teacher_width), ("steps", steps), ("batch_size", batch_size),
                           ("hyper_every", hyper_every), ("neumann_steps", neumann_steps),
                           ("validation_batch", validation_batch), ("evaluation_steps", evaluation_steps),
                           ("objective_seeds", objective_seeds), ("log_interval", log_interval)):
            check_int(value, key, 1)
        for key, value in (("lr", lr), ("neumann_lr", neumann_lr), ("evaluation_lr", evaluation_lr)):
            check_float(value, key, 0.0, strict_minimum=True)
        check_float(teacher_lr, "teacher_lr", 0.0)
        self.evaluation_students, self.evaluation = evaluation_options(
            evaluation_students, steps=evaluation_steps, lr=evaluation_lr, batch_size=batch_size,
            log_interval=log_interval)
        self.commentary, self.teacher_width = commentary, teacher_width
        self.student_lr, self.teacher_lr, self.batch_size, self.hyper_every = lr, teacher_lr, batch_size, hyper_every
        self.neumann_steps, self.neumann_lr, self.validation_batch = neumann_steps, neumann_lr, validation_batch
        self.objective_seeds, self.log_interval = range(objective_seeds), log_interval
        self.student_spec = student or {"class": "CNN", "width": 16}
        self.use_data(data, context)
        if self.data.input_shape[0] != 3:
            raise ValueError(f"attention masks need colour images; {self.data.name} has "
                             f"{self.data.input_shape[0]} channel(s)")
        self.saved = None
        if commentary is not None and self.masks in ("learned", "permuted"):
            self.saved = storage.load_teacher(commentary, method="AttentionMasks")
            self.sigma, self.teacher_width = self.saved["teacher"]["sigma"], self.saved["teacher"]["width"]
        self.learning = self.masks in ("learned", "permuted") and commentary is None
        self.steps = steps if self.learning else 0
        self.record = {}

    def setup(self):
        device = self.context.device
        self.generator = torch.Generator().manual_seed(self.context.seed)
        self.teacher = None
        if self.masks not in ("learned", "permuted"):
            return
        self.teacher = build_teacher(self.data.input_shape[0], self.teacher_width).to(device)
        if self.saved is not None:
            self.teacher.load_state_dict(self.saved["tensors"])
        self.params = dict(self.teacher.named_parameters())
        if self.learning:
            self.student = build_student(self.student_spec, self.data, "teaching.student").to(device)
            self.weights = fresh_weights(self.student, device)
            self.inner = torch.optim.Adam(self.weights.values(), lr=self.student_lr)
            self.outer = torch.optim.Adam(self.params.values(), lr=self.teacher_lr)

    def checkpointed(self):
        if not self.learning:
            return {}
        return {"teacher": self.teacher, "weights": self.weights, "inner": self.inner, "outer": self.outer,
                "generator": self.generator, "record": self.record}

    def masker(self, kind="learned"):
        return Masker(kind, self.teacher, getattr(self, "params", None), self.sigma)

    def begin(self):
        if self.learning:
            self.record["objective_initial"] = mask_objective(self.masker(), self.data, self.student_spec,
                                                              self.evaluation, self.objective_seeds,
                                                              self.context.device)
            self.record["red_quadrant_hits_initial"] = red_quadrant_hit_rate(self.teacher, self.params, self.data)

    def outer_step(self, step):
        data, device = self.data, self.context.device
        indices = torch.randint(0, len(data.training_inputs), (self.batch_size,), generator=self.generator)
        indices = indices.to(device)
        x, y = data.training_inputs[indices], data.training_targets[indices]
        loss = masked_loss(self.student, self.weights, self.teacher, self.params, x, y, self.sigma)
        self.inner.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.weights.values()))
        self.inner.step()
        metrics = {"Loss/Training": loss.detach()}
        if (step + 1) % self.hyper_every == 0:
            chosen = torch.randint(0, len(data.validation_inputs), (self.validation_batch,), generator=self.generator)
            chosen = chosen.to(device)
            result = mask_hypergradient(self.student, self.teacher, self.sigma, self.weights, self.params, (x, y),
                                        (data.validation_inputs[chosen], data.validation_targets[chosen]),
                                        self.neumann_lr, self.neumann_steps)
            set_grads(self.params.values(), result.gradient.values())
            self.outer.step()
            metrics["Loss/Validation"] = result.value
        return metrics

    def finish(self, steps_done):
        teaching = dict(self.record)
        if self.learning:
            teaching["objective_learned"] = mask_objective(self.masker(), self.data, self.student_spec,
                                                           self.evaluation, self.objective_seeds,
                                                           self.context.device)
            teaching["red_quadrant_hits_learned"] = red_quadrant_hit_rate(self.teacher, self.params, self.data)
            for tag, key in (("Objective_Initial", "objective_initial"), ("Objective_Learned", "objective_learned"),
                             ("Red_Quadrant_Hits", "red_quadrant_hits_learned")):
                self.context.tracker.scalar(f"Commentary/{tag}", teaching[key], steps_done)
        masker = self.masker(self.masks)
        if self.masks != "none":
            plot_masks(masker, self.data, self.context, steps_done)
        final = train_students(self.evaluation_students, self.data, masker, self.evaluation, self.context,
                               evaluation_generator(self.context.seed))
        return {"final": final, "teaching": teaching}

    def export(self):
        if not self.learning:
            return None
        return {"tensors": self.teacher.state_dict(), "dataset": self.data_spec,
                "learned_by": {"algorithm": "implicit (Algorithm 2)", "steps": self.steps,
                               "neumann_steps": self.neumann_steps, "seed": self.context.seed},
                "config": {"teacher_lr": self.teacher_lr, "lr": self.student_lr, "batch_size": self.batch_size,
                           "student": self.student_spec},
                "teacher": {"width": self.teacher_width, "sigma": self.sigma}}

    @classmethod
    def frozen_teaching(cls, payload, data, device):
        teacher = build_teacher(data.input_shape[0], payload["teacher"]["width"]).to(device)
        teacher.load_state_dict(payload["tensors"])
        return Masker("learned", teacher, dict(teacher.named_parameters()), payload["teacher"]["sigma"])
