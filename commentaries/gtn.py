"""Generative Teaching Networks (Such et al., 2019) on the hypergradient engine.

A *generator* maps noise and a class label to a synthetic image. A freshly
initialised *learner* is trained for K inner SGD steps on K synthetic batches,
with every update kept in the autograd graph (``torch.func.functional_call``
on a dictionary of weights, no ``higher``), and its loss on a batch of *real*
training data is differentiated back through all K steps into the generator
(Raghu et al.'s Algorithm 1: backpropagation through training). The inner
learning rate is learned too, as in the paper.

Three input variants, chosen by ``input``:

* ``learned``: the generator's K×B noise inputs are themselves a learned
  tensor, one slice per inner step, so the generator can teach a *curriculum*;
* ``fixed``: a fixed random K×B tensor, drawn once;
* ``noise``: fresh Gaussian noise every outer step.

The curriculum check trains fresh learners on the generated batches in the
learned order and in shuffled orders and reports the test-accuracy drop; a
grid of generated samples per inner step is written as a PNG and logged to
TensorBoard. ``input: real`` is the baseline without a generator: the learner
takes K steps on random real training batches (only its learning rate is
learned).

``truncation: T`` is the memory-bounded mode: only the last T inner steps
(and their generated images) keep a graph, so memory grows with T, not K
(:func:`peak_saved_bytes` measures it).

Data comes from ``datasets.DATASETS`` (default: the embedded 8×8 digits with
300 validation and 400 test images, offline, CPU-sized); learners from
``models.MODELS`` (``learner: {class: MLP, hidden: [64]}``), and
``transfer_learners`` trains other architectures on the final generated
batches to see whether the teaching transfers. The saved teacher trains a
fresh student through ``TrainWithCommentary`` on its generated batches.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from commentaries import TEACHERS  # noqa: E402
from commentaries.bilevel import sgd_steps  # noqa: E402
from commentaries.common import (DIGITS, FrozenTeaching, build_student, check_bool, check_choice,  # noqa: E402
                                 check_float, check_int, check_list, save_figure, split_pairs)
from commentaries.loop import TeachingMethod  # noqa: E402

INPUT_KINDS = ("learned", "fixed", "noise", "real")


# ----------------------------------------------------------------------------- networks

class Generator(nn.Module):
    """(noise, label) -> image in [0, 1]: an MLP on the noise and the one-hot label."""

    def __init__(self, noise_size, num_classes, image_shape, hidden_size=128):
        super().__init__()
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Linear(noise_size + num_classes, hidden_size), nn.LeakyReLU(0.1),
            nn.Linear(hidden_size, hidden_size), nn.LeakyReLU(0.1),
            nn.Linear(hidden_size, math.prod(self.image_shape)))

    def forward(self, noise, labels):
        one_hot = F.one_hot(labels, self.num_classes).to(noise.dtype)
        pixels = torch.sigmoid(self.net(torch.cat([noise, one_hot], dim=-1)))
        return pixels.view(-1, *self.image_shape)


def init_learner_params(learner, rng, dtype=None, device=None):
    """Fresh weights for ``learner`` (any architecture) as a dict of leaf tensors:
    each layer's own ``reset_parameters`` under a seed drawn from ``rng``, so
    every outer step meets a new learner yet runs are reproducible and the
    global random stream is untouched."""
    seed = int(torch.randint(2 ** 62, (1,), generator=rng))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in learner.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return {name: parameter.detach().clone().to(dtype=dtype or parameter.dtype,
                                                device=device or parameter.device)
            for name, parameter in learner.named_parameters()}


# ----------------------------------------------------------------------------- inner loop

def train_learner(learner, params, images, labels, lr, momentum=0.0, differentiable=True,
                  truncation=None, on_step=None):
    """K steps of SGD with momentum on the batches ``images[k]`` (labels ``labels[k]``).

    With ``differentiable`` every update stays in the graph (create_graph), so
    the returned weights are functions of the images and of ``lr``. With
    ``truncation = T`` the graph is cut before the last T steps (a memory-bounded
    mode: memory grows with T, not K). ``on_step(k, params)`` sees the weights
    after each step (for accuracy-along-training curves).
    """
    steps = len(images)
    first_graph_step = steps if not differentiable else steps - (truncation or steps)

    def loss(weights, step):
        return F.cross_entropy(functional_call(learner, weights, (images[step],)), labels[step])

    return sgd_steps(loss, params, range(steps), lr, momentum, graph=lambda step: step >= first_graph_step,
                     on_step=on_step)


def balanced_labels(steps, batch_size, num_classes, device=None):
    """Labels of the synthetic batches: every class equally often, same each step."""
    return (torch.arange(batch_size, device=device) % num_classes).expand(steps, batch_size)


def generate(generator, inputs, labels, truncation=None):
    """Synthetic images for inputs [K, B, noise] and labels [K, B] -> [K, B, *image].

    With ``truncation = T`` only the last T steps' images keep a graph: the
    hypergradient cannot reach the others, so their generator activations are
    not stored (this is what bounds memory by T rather than K)."""
    steps, batch = labels.shape
    if truncation is not None and truncation < steps:
        with torch.no_grad():
            early = generate(generator, inputs[:steps - truncation], labels[:steps - truncation])
        late = generate(generator, inputs[steps - truncation:], labels[steps - truncation:])
        return torch.cat([early, late])
    images = generator(inputs.reshape(steps * batch, -1), labels.reshape(-1))
    return images.view(steps, batch, *generator.image_shape)


def meta_loss(generator, inputs, labels, learner, init_params, lr, momentum, real_images,
              real_labels, truncation=None):
    """Loss on real data of a learner trained by K differentiable steps on generated data."""
    images = generate(generator, inputs, labels, truncation)
    params = train_learner(learner, init_params, images, labels, lr, momentum,
                           differentiable=True, truncation=truncation)
    return F.cross_entropy(functional_call(learner, params, (real_images,)), real_labels)


# ----------------------------------------------------------------------------- the teacher

class Teacher:
    """Everything learned in the outer loop: generator, inputs (if learned), log lr."""

    def __init__(self, input_kind, noise_size, num_classes, image_shape, generator_hidden,
                 inner_steps, batch_size, inner_lr, learn_inner_lr, rng, device):
        self.input_kind = input_kind
        self.noise_size = noise_size
        self.inner_steps = inner_steps
        self.batch_size = batch_size
        self.rng = rng
        self.generator = None
        self.inputs = None
        if input_kind != "real":
            self.generator = Generator(noise_size, num_classes, image_shape, generator_hidden).to(device)
        if input_kind in ("learned", "fixed"):
            inputs = torch.randn(inner_steps, batch_size, noise_size, generator=rng).to(device)
            self.inputs = nn.Parameter(inputs, requires_grad=input_kind == "learned")
        self.log_lr = nn.Parameter(torch.tensor(math.log(inner_lr), device=device),
                                   requires_grad=learn_inner_lr)
        self.labels = balanced_labels(inner_steps, batch_size, num_classes, device)

    def parameters(self):
        params = [] if self.generator is None else list(self.generator.parameters())
        params += [p for p in (self.inputs, self.log_lr) if p is not None and p.requires_grad]
        return params

    def lr(self):
        return self.log_lr.exp()

    def draw_inputs(self, rng=None):
        """The K×B generator inputs for one learner (fresh noise for ``noise``)."""
        if self.input_kind == "noise":
            noise = torch.randn(self.inner_steps, self.batch_size, self.noise_size,
                                generator=rng or self.rng)
            return noise.to(self.log_lr.device)
        return self.inputs

    def batches(self, train_images, train_labels, rng=None, order=None, truncation=None):
        """The K training batches (images, labels) for one learner.

        ``order`` permutes the inner steps (the curriculum check); with
        ``truncation`` only the last steps' images keep a graph."""
        if self.input_kind == "real":
            index = torch.randint(len(train_labels), (self.inner_steps, self.batch_size),
                                  generator=rng or self.rng).to(train_labels.device)
            images, labels = train_images[index], train_labels[index]
        else:
            inputs, labels = self.draw_inputs(rng), self.labels
            if order is not None:
                inputs, labels = inputs[order], labels[order]
            images = generate(self.generator, inputs, labels, truncation)
        return images, labels


def evaluate(teacher, learner, train, splits, learners, momentum, seed, order=None, curve_on=None):
    """Train ``learners`` fresh learners on the teacher's batches (no graph) and
    average loss/accuracy on every split in ``splits``; optionally the accuracy
    on split ``curve_on`` after every inner step. ``train`` is the real training
    data (sampled only by the ``real`` baseline)."""
    rng = torch.Generator().manual_seed(seed)
    device = teacher.log_lr.device
    totals = {}
    curve = torch.zeros(teacher.inner_steps)
    for _ in range(learners):
        with torch.no_grad():
            images, labels = teacher.batches(*train, rng=rng, order=order)
        params = init_learner_params(learner, rng, device=device)

        def record(step, params):
            if curve_on is not None:
                with torch.no_grad():
                    x, y = splits[curve_on]
                    logits = functional_call(learner, params, (x,))
                    curve[step] += (logits.argmax(-1) == y).double().mean().cpu() / learners

        params = train_learner(learner, params, images, labels, teacher.lr().detach(),
                               momentum, differentiable=False, on_step=record)
        with torch.no_grad():
            for name, (x, y) in splits.items():
                logits = functional_call(learner, params, (x,))
                loss = F.cross_entropy(logits, y)
                accuracy = (logits.argmax(-1) == y).double().mean()
                totals[name] = totals.get(name, 0) + torch.stack([loss.double(), accuracy]) / learners
    metrics = {name: (float(value[0]), float(value[1])) for name, value in totals.items()}
    return metrics, curve.tolist()


# ----------------------------------------------------------------------------- teacher files

def teacher_tensors(teacher):
    """The GTN teacher's learned state as named tensors."""
    tensors = {"log_lr": teacher.log_lr, "labels": teacher.labels}
    if teacher.generator is not None:
        tensors.update({f"generator.{name}": value for name, value in teacher.generator.state_dict().items()})
    if teacher.inputs is not None:
        tensors["inputs"] = teacher.inputs
    return tensors


# ----------------------------------------------------------------------------- plots

def plot_samples(teacher, context, step, max_rows=12):
    """Grid of generated samples: a row per inner step (evenly spaced when K is
    large), a column per class; ``generated_samples.png`` and TensorBoard."""
    if teacher.generator is None:
        return
    with torch.no_grad():
        rng = torch.Generator().manual_seed(1)
        images = generate(teacher.generator, teacher.draw_inputs(rng), teacher.labels).cpu()
    images = images.permute(0, 1, 3, 4, 2).numpy()  # K, B, H, W, C for imshow
    steps, classes = images.shape[0], teacher.generator.num_classes
    rows = sorted(set(torch.linspace(0, steps - 1, min(steps, max_rows)).round().long().tolist()))
    columns = min(classes, teacher.batch_size)
    figure, axes = plt.subplots(len(rows), columns, figsize=(0.8 * columns + 1, 0.8 * len(rows) + 0.6),
                                squeeze=False)
    for row, inner_step in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            image = images[inner_step, column]
            if image.shape[-1] == 1:
                axis.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1)
            else:
                axis.imshow(image.clip(0, 1))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"{int(teacher.labels[0, column])}", fontsize=9)
            if column == 0:
                axis.set_ylabel(f"step {inner_step + 1}", fontsize=8)
    figure.suptitle(f"GTN ({teacher.input_kind} input): generated samples per inner step "
                    "(columns: label)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, context, "generated_samples", step)


def plot_curriculum(curves, context, step):
    """Test accuracy of learners along the inner steps: learned order vs shuffled."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), curve, marker="o", label=label)
    axis.set_xlabel("inner step")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("Learners trained on generated batches")
    figure.tight_layout()
    save_figure(figure, context, "inner_step_accuracy", step)


# ----------------------------------------------------------------------------- entry point

def check_options(input, truncation, inner_steps, learn_inner_lr, transfer_learners, **numbers):
    """Types and ranges of the GTN options (``teaching.<key>: ...`` user errors)."""
    check_choice(input, "input", INPUT_KINDS)
    check_bool(learn_inner_lr, "learn_inner_lr")
    check_list(transfer_learners, "transfer_learners")
    check_int(inner_steps, "inner_steps", 1)
    for key in ("batch_size", "real_batch_size", "noise_size", "generator_hidden",
                "eval_learners", "log_interval"):
        check_int(numbers[key], key, 1)
    for key in ("outer_steps", "shuffles"):
        check_int(numbers[key], key, 0)
    for key in ("inner_lr", "max_grad_norm"):
        check_float(numbers[key], key, 0.0, strict_minimum=True)
    check_float(numbers["outer_lr"], "outer_lr", 0.0)
    check_float(numbers["inner_momentum"], "inner_momentum", 0.0, 1.0)
    if truncation is not None:
        check_int(truncation, "truncation", 1, inner_steps)


@TEACHERS.register("GTN", aliases=["GenerativeTeachingNetwork"])
class GenerativeTeachingNetwork(TeachingMethod):
    """Train a GTN teacher (see the module docstring); one outer step is one
    fresh learner's K inner steps and the teacher's update.

    ``learner`` is a student spec (``{class: MLP, hidden: [64]}``, the default;
    ``CNN``, ``Linear``); ``transfer_learners`` lists other architectures that
    are trained on the final generated batches and evaluated on real test data.
    """

    def __init__(self, *, context, data=None, input="learned", outer_steps=300, inner_steps=8, batch_size=50,
                 real_batch_size=256, noise_size=16, generator_hidden=128, learner=None, inner_lr=0.2,
                 learn_inner_lr=True, inner_momentum=0.5, outer_lr=0.01, max_grad_norm=10.0, truncation=None,
                 eval_learners=4, shuffles=4, transfer_learners=(), log_interval=50):
        check_options(input, truncation, inner_steps, learn_inner_lr, transfer_learners,
                      outer_steps=outer_steps, batch_size=batch_size, real_batch_size=real_batch_size,
                      noise_size=noise_size, generator_hidden=generator_hidden, inner_lr=inner_lr,
                      inner_momentum=inner_momentum, outer_lr=outer_lr, max_grad_norm=max_grad_norm,
                      eval_learners=eval_learners, shuffles=shuffles, log_interval=log_interval)
        self.context, self.input, self.steps, self.log_interval = context, input, outer_steps, log_interval
        self.inner_steps, self.batch_size, self.real_batch_size = inner_steps, batch_size, real_batch_size
        self.noise_size, self.generator_hidden, self.inner_lr = noise_size, generator_hidden, inner_lr
        self.learn_inner_lr, self.momentum, self.outer_lr = learn_inner_lr, inner_momentum, outer_lr
        self.max_grad_norm, self.truncation, self.eval_learners = max_grad_norm, truncation, eval_learners
        self.shuffles, self.transfer_learners = shuffles, list(transfer_learners)
        self.learner_spec = learner or {"class": "MLP", "hidden": [64]}
        self.use_data(dict(data or DIGITS), context)
        self.splits = split_pairs(self.data)

    def setup(self):
        device = self.context.device
        self.rng = torch.Generator().manual_seed(self.context.seed)
        self.teacher = Teacher(self.input, self.noise_size, self.data.output_size, self.data.input_shape,
                               self.generator_hidden, self.inner_steps, self.batch_size, self.inner_lr,
                               self.learn_inner_lr, self.rng, device)
        self.learner = build_student(self.learner_spec, self.data, "teaching.learner").to(device)
        self.parameters = self.teacher.parameters()
        self.optimiser = torch.optim.Adam(self.parameters, lr=self.outer_lr) if self.parameters else None

    def checkpointed(self):
        state = {"log_lr": self.teacher.log_lr, "rng": self.rng}
        if self.teacher.generator is not None:
            state["generator"] = self.teacher.generator
        if self.teacher.inputs is not None:
            state["inputs"] = self.teacher.inputs
        if self.optimiser is not None:
            state["optimiser"] = self.optimiser
        return state

    def outer_step(self, step):
        train_images, train_labels = self.splits["train"]
        device = self.context.device
        real = torch.randint(len(train_labels), (self.real_batch_size,), generator=self.rng).to(device)
        init_params = init_learner_params(self.learner, self.rng, device=device)
        images, labels = self.teacher.batches(train_images, train_labels, truncation=self.truncation)
        params = train_learner(self.learner, init_params, images, labels, self.teacher.lr(), self.momentum,
                               differentiable=True, truncation=self.truncation)
        loss = F.cross_entropy(functional_call(self.learner, params, (train_images[real],)), train_labels[real])
        metrics = {"Loss/Training": loss.detach()}
        if self.optimiser is not None:
            self.optimiser.zero_grad()
            loss.backward()
            metrics["Hypergradient/Norm"] = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
            self.optimiser.step()
        metrics["Hyperparameter/Lr"] = self.teacher.lr().detach()
        return metrics

    def evaluate(self, step):
        metrics, _ = evaluate(self.teacher, self.learner, self.splits["train"],
                              {"validation": self.splits["validation"]}, self.eval_learners, self.momentum,
                              seed=self.context.seed + 1)
        return {"Loss/Validation": metrics["validation"][0], "Accuracy/Validation": metrics["validation"][1]}

    def finish(self, steps_done):
        final = final_metrics(self.teacher, self.learner, self.splits, self.eval_learners, self.shuffles,
                              self.momentum, self.context, steps_done)
        for index, spec in enumerate(self.transfer_learners):
            final.update(transfer_metrics(self.teacher, spec, index, self.data, self.splits, self.eval_learners,
                                          self.momentum, self.context.seed + 4))
        lr = float(self.teacher.lr().detach())
        return {"final": final, "teaching": {"inner_lr": lr},
                "hyperparameters": {"lr": lr, "momentum": self.momentum}}

    def export(self):
        return {"tensors": teacher_tensors(self.teacher), "dataset": self.data_spec,
                "learned_by": {"algorithm": "unrolled (GTN)", "outer_steps": self.steps,
                               "inner_steps": self.inner_steps, "seed": self.context.seed},
                "teacher": {"input": self.input, "noise_size": self.noise_size,
                            "generator_hidden": self.generator_hidden, "inner_steps": self.inner_steps,
                            "batch_size": self.batch_size, "momentum": self.momentum},
                "config": {"learner": self.learner_spec}}

    @classmethod
    def frozen_teaching(cls, payload, data, device):
        """The teacher's K generated batches, in its order, repeated; the
        ``input: real`` baseline has no generator: plain real batches."""
        options, tensors = payload["teacher"], payload["tensors"]
        if options["input"] == "real":
            return FrozenTeaching()
        generator = Generator(options["noise_size"], data.output_size, data.input_shape,
                              options["generator_hidden"])
        generator.load_state_dict({name.removeprefix("generator."): value for name, value in tensors.items()
                                   if name.startswith("generator.")})
        labels = tensors["labels"]
        inputs = tensors.get("inputs")
        if inputs is None:  # fresh noise: one draw, reproducible
            inputs = torch.randn(*labels.shape, options["noise_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            images = generate(generator.to(device), inputs.to(device), labels.to(device))
        return GeneratedBatches(images, labels.to(device))


class GeneratedBatches(FrozenTeaching):
    """A frozen GTN's synthetic batches: batch ``k mod K`` at step ``k`` (its
    own batch size: the teacher fixed it)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def batch(self, data, step, batch_size, generator):
        index = step % len(self.images)
        return self.images[index], self.labels[index]


def final_metrics(teacher, learner, splits, eval_learners, shuffles, momentum, context, step):
    """Final evaluation, the curriculum (shuffled-order) check and the plots."""
    metrics, curve = evaluate(teacher, learner, splits["train"], splits, eval_learners, momentum,
                              seed=context.seed + 2, curve_on="test")
    final = {}
    for name, tag in (("train", "Training"), ("validation", "Validation"), ("test", "Test")):
        final[f"Loss/{tag}"], final[f"Accuracy/{tag}"] = metrics[name]
    curves = {"learned order": curve}
    if teacher.input_kind in ("learned", "fixed") and shuffles > 0:
        shuffled_accuracy, shuffled_curve = 0.0, torch.zeros(teacher.inner_steps)
        order_rng = torch.Generator().manual_seed(context.seed + 3)
        for _ in range(shuffles):
            order = torch.randperm(teacher.inner_steps, generator=order_rng).to(teacher.log_lr.device)
            shuffled, curve = evaluate(teacher, learner, splits["train"], {"test": splits["test"]},
                                       eval_learners, momentum, seed=context.seed + 2, order=order,
                                       curve_on="test")
            shuffled_accuracy += shuffled["test"][1] / shuffles
            shuffled_curve += torch.tensor(curve) / shuffles
        final["Accuracy/Test_Shuffled_Order"] = shuffled_accuracy
        final["Accuracy/Shuffle_Drop"] = final["Accuracy/Test"] - shuffled_accuracy
        curves["shuffled order"] = shuffled_curve.tolist()
    plot_samples(teacher, context, step)
    plot_curriculum(curves, context, step)
    return final


def transfer_metrics(teacher, spec, index, data, splits, eval_learners, momentum, seed):
    """Test loss/accuracy of another architecture trained on the generated batches
    (with the learned learning rate): does the teaching transfer?"""
    where = f"teaching.transfer_learners[{index}]"
    learner = build_student(spec, data, where).to(teacher.log_lr.device)
    name = spec if isinstance(spec, str) else spec.get("class")
    metrics, _ = evaluate(teacher, learner, splits["train"], {"test": splits["test"]}, eval_learners,
                          momentum, seed=seed)
    return {f"Loss/Test_Transfer_{index}_{name}": metrics["test"][0],
            f"Accuracy/Test_Transfer_{index}_{name}": metrics["test"][1]}


# ----------------------------------------------------------------------------- memory

def peak_saved_bytes(inner_steps, truncation=None, batch_size=50, noise_size=16, seed=0):
    """Peak live bytes autograd keeps for one outer step (meta-loss forward and
    backward) of a digits-sized GTN with learned inputs: the memory the unroll
    grows with. Full unrolls grow linearly in K; ``truncation = T`` bounds it by
    T. (For bench/RESULTS.md; exact on any device, via saved-tensor hooks.)

        python -c "from commentaries import gtn; print(gtn.peak_saved_bytes(128, 8))"
    """
    from commentaries.common import SavedTensorMeter
    from models import MLP

    torch.manual_seed(seed)
    generator = Generator(noise_size, 10, (1, 8, 8))
    inputs = torch.randn(inner_steps, batch_size, noise_size, requires_grad=True)
    labels = balanced_labels(inner_steps, batch_size, 10)
    learner = MLP(hidden=[64], input_shape=(1, 8, 8), output_size=10)
    init = init_learner_params(learner, torch.Generator().manual_seed(seed))
    real_images, real_labels = torch.rand(256, 1, 8, 8), torch.randint(10, (256,))
    meter = SavedTensorMeter()
    with meter.measure():
        loss = meta_loss(generator, inputs, labels, learner, init, torch.tensor(0.2, requires_grad=True),
                         0.5, real_images, real_labels, truncation=truncation)
        loss.backward()
    return meter.peak
