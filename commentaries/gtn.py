"""Generative Teaching Networks (Such et al., 2019) on the hypergradient engine.

A *generator* maps noise and a class label to a synthetic image. A freshly
initialised *learner* is trained for K inner SGD steps on K synthetic batches
(the shared inner loop, :class:`common.InnerSGD`), and its loss on a batch of
*real* training data is differentiated back through all K steps into the
generator by the core's :func:`hypergradients.unrolled` (Raghu et al.'s
Algorithm 1: backpropagation through training). The inner learning rate is
learned too, as in the paper. The outer step (Adam, the core's pure outer
optimiser, on the clipped hypergradient) is a pure function of the teacher's
tensors, so ``--population N`` trains N seeds as one ``torch.func.vmap``.

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
(and their generated images, made inside each step) keep a graph, so memory
grows with T, not K (:func:`peak_saved_bytes` measures it).

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

import optimisers  # noqa: E402
from commentaries import TEACHERS  # noqa: E402
from commentaries.common import (DIGITS, FrozenTeaching, InnerSGD, build_student, check_bool,  # noqa: E402
                                 check_choice, check_float, check_int, check_list, reset_weights,
                                 save_figure, split_pairs)
from commentaries.loop import PureTeachingMethod  # noqa: E402
from hypergradients import unrolled  # noqa: E402
from trees import tree_leaves, tree_map  # noqa: E402

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


# ----------------------------------------------------------------------------- inner loop

def train_learner(learner, params, images, labels, lr, momentum=0.0, on_step=None):
    """K plain SGD steps (no graph) on the batches ``images[k]`` (labels
    ``labels[k]``): the evaluation learners, on the same inner loop
    (:class:`common.InnerSGD`) as the teaching. ``on_step(k, params)`` sees the
    weights after each step (for accuracy-along-training curves)."""
    def loss(weights, _, step):
        return F.cross_entropy(functional_call(learner, weights, (images[step],)), labels[step])

    inner = InnerSGD(loss, list(params), lr, momentum)
    return inner.weights(inner.run(inner.init(params), {}, range(len(images)), on_step))


def balanced_labels(steps, batch_size, num_classes, device=None):
    """Labels of the synthetic batches: every class equally often, same each step."""
    return (torch.arange(batch_size, device=device) % num_classes).expand(steps, batch_size)


def generate(generator, inputs, labels):
    """Synthetic images for inputs [K, B, noise] and labels [K, B] -> [K, B, *image]
    (all K batches at once: evaluation, plots, reuse)."""
    steps, batch = labels.shape
    images = generator(inputs.reshape(steps * batch, -1), labels.reshape(-1))
    return images.view(steps, batch, *generator.image_shape)


def batch_at(generator, teacher, step):
    """The learner's training batch at inner step ``step``: generated from
    ``teacher["inputs"][step]`` with the generator's weights
    ``teacher["generator.<name>"]``, or the real ``teacher["images"][step]``
    (``input: real``). ``teacher`` holds tensors by the names of teacher files."""
    labels = teacher["labels"][step]
    if "images" in teacher:
        return teacher["images"][step], labels
    weights = {name.removeprefix("generator."): value for name, value in teacher.items()
               if name.startswith("generator.")}
    return functional_call(generator, weights, (teacher["inputs"][step], labels)), labels


def lesson(generator, learner, init, fixed, momentum, real):
    """One fresh learner's lesson as the pieces of
    :func:`hypergradients.unrolled`: the inner loop on the teacher's K
    batches (its outer variables: the *learned* teacher tensors, joined to
    the ``fixed`` ones), the start state from ``init`` and the meta-loss, the
    trained learner's cross-entropy on the ``real`` batch (images, labels)."""
    def loss(weights, learned, step):
        images, labels = batch_at(generator, {**fixed, **learned}, step)
        return F.cross_entropy(functional_call(learner, weights, (images,)), labels)

    inner = InnerSGD(loss, list(init), lambda learned: {**fixed, **learned}["log_lr"].exp(), momentum)

    def meta_loss(state, _):
        return F.cross_entropy(functional_call(learner, inner.weights(state), (real[0],)), real[1])

    return inner, inner.init(init), meta_loss


def meta_hypergradient(generator, learner, init, learned, fixed, momentum, real, truncation=None,
                       chunk_size=None):
    """The loss on real data of a learner trained by K SGD steps on the
    teacher's batches, and its gradient with respect to the ``learned``
    teacher tensors: :func:`hypergradients.unrolled` (Raghu et al.'s
    Algorithm 1), through the last ``truncation`` steps only if given, with
    exact ``chunk_size`` checkpointing if given."""
    inner, start, meta_loss = lesson(generator, learner, init, fixed, momentum, real)
    return unrolled(inner.step, start, learned, len(fixed["labels"]), meta_loss,
                    chunk_size=chunk_size, truncation=truncation)


def meta_loss(generator, learner, init, teacher, momentum, real):
    """The same loss without a graph (``teacher``: every tensor, learned or not)."""
    inner, start, loss = lesson(generator, learner, init, teacher, momentum, real)
    with torch.no_grad():
        return loss(inner.run(start, {}, range(len(teacher["labels"]))), None)


def clip_by_global_norm(tree, max_norm):
    """``torch.nn.utils.clip_grad_norm_``'s rule on a tree, without side
    effects: the gradients scaled by ``min(1, max_norm / (|g| + 1e-6))``, and ``|g|``."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in tree_leaves(tree)]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return tree_map(lambda g: g * scale, tree), norm


# ----------------------------------------------------------------------------- the teacher

class Teacher:
    """Everything the outer loop holds: generator, inputs (learned or fixed),
    log lr (learned or not). :meth:`learned` and :meth:`fixed` give them as
    tensors by name for the pure outer step; :meth:`load` takes new values."""

    def __init__(self, input_kind, noise_size, num_classes, image_shape, generator_hidden,
                 inner_steps, batch_size, inner_lr, learn_inner_lr, rng, device):
        self.input_kind = input_kind
        self.noise_size = noise_size
        self.inner_steps = inner_steps
        self.batch_size = batch_size
        self.learn_inner_lr = learn_inner_lr
        self.rng = rng
        self.generator = None
        self.inputs = None
        if input_kind != "real":
            self.generator = Generator(noise_size, num_classes, image_shape, generator_hidden).to(device)
        if input_kind in ("learned", "fixed"):
            self.inputs = torch.randn(inner_steps, batch_size, noise_size, generator=rng).to(device)
        self.log_lr = torch.tensor(math.log(inner_lr), device=device)
        self.labels = balanced_labels(inner_steps, batch_size, num_classes, device)

    def _tensors(self):
        tensors = {} if self.generator is None else {
            f"generator.{name}": parameter for name, parameter in self.generator.named_parameters()}
        if self.inputs is not None:
            tensors["inputs"] = self.inputs
        tensors["log_lr"] = self.log_lr
        return tensors

    def learned(self):
        """The tensors the outer loop learns, by name (as teacher files name them)."""
        learned = {name: tensor.detach() for name, tensor in self._tensors().items()
                   if name.startswith("generator.")}
        if self.input_kind == "learned":
            learned["inputs"] = self.inputs
        if self.learn_inner_lr:
            learned["log_lr"] = self.log_lr
        return learned

    def fixed(self):
        """The teacher's other tensors, which differ between seeds (fixed inputs, a fixed lr)."""
        return {name: tensor for name, tensor in self._tensors().items()
                if not name.startswith("generator.") and name not in self.learned()}

    def load(self, tensors):
        """Take new values of the named tensors, in place."""
        targets = self._tensors()
        with torch.no_grad():
            for name, value in tensors.items():
                targets[name].copy_(value)

    def lr(self):
        return self.log_lr.exp()

    def draw_inputs(self, rng=None):
        """The K×B generator inputs for one learner (fresh noise for ``noise``)."""
        if self.input_kind == "noise":
            noise = torch.randn(self.inner_steps, self.batch_size, self.noise_size,
                                generator=rng or self.rng)
            return noise.to(self.log_lr.device)
        return self.inputs

    def batches(self, train_images, train_labels, rng=None, order=None):
        """The K training batches (images, labels) for one evaluation learner;
        ``order`` permutes the inner steps (the curriculum check)."""
        if self.input_kind == "real":
            index = torch.randint(len(train_labels), (self.inner_steps, self.batch_size),
                                  generator=rng or self.rng).to(train_labels.device)
            images, labels = train_images[index], train_labels[index]
        else:
            inputs, labels = self.draw_inputs(rng), self.labels
            if order is not None:
                inputs, labels = inputs[order], labels[order]
            images = generate(self.generator, inputs, labels)
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
        params = reset_weights(learner, rng, device=device)

        def record(step, params):
            if curve_on is not None:
                with torch.no_grad():
                    x, y = splits[curve_on]
                    logits = functional_call(learner, params, (x,))
                    curve[step] += (logits.argmax(-1) == y).double().mean().cpu() / learners

        params = train_learner(learner, params, images, labels, teacher.lr().detach(),
                               momentum, on_step=record)
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
class GenerativeTeachingNetwork(PureTeachingMethod):
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
        self.outer_optimiser = optimisers.HYPERPARAMETER_OPTIMISERS.get("Adam")(lr=self.outer_lr)
        learned = self.teacher.learned()
        self.optimiser_state = self.outer_optimiser.init(learned) if learned else {}

    def checkpointed(self):
        state = {"log_lr": self.teacher.log_lr, "rng": self.rng, "optimiser": self.optimiser_state}
        if self.teacher.generator is not None:
            state["generator"] = self.teacher.generator
        if self.teacher.inputs is not None:
            state["inputs"] = self.teacher.inputs
        return state

    def outer_state(self):
        return {"learned": self.teacher.learned(), "fixed": self.teacher.fixed(),
                "optimiser": self.optimiser_state}

    def load_outer_state(self, state):
        self.teacher.load({**state["fixed"], **state["learned"]})
        self.optimiser_state = state["optimiser"]

    def outer_inputs(self, step):
        """The real batch, a fresh learner and (``noise``, ``real``) its K
        batches' draws, from the run's generator, in that order."""
        train_labels, device = self.splits["train"][1], self.context.device
        inputs = {"real": torch.randint(len(train_labels), (self.real_batch_size,), generator=self.rng).to(device),
                  "init": reset_weights(self.learner, self.rng, device=device)}
        if self.input == "noise":
            inputs["noise"] = self.teacher.draw_inputs()
        elif self.input == "real":
            inputs["indices"] = torch.randint(len(train_labels), (self.inner_steps, self.batch_size),
                                              generator=self.rng).to(device)
        return inputs

    def pure_outer_step(self, state, inputs):
        """One teacher step: Adam on the clipped hypergradient of the real-data
        loss of a fresh learner trained on the teacher's K batches."""
        train_images, train_labels = self.splits["train"]
        fixed = {**state["fixed"], "labels": self.teacher.labels}
        if "noise" in inputs:
            fixed["inputs"] = inputs["noise"]
        if "indices" in inputs:
            fixed["images"], fixed["labels"] = train_images[inputs["indices"]], train_labels[inputs["indices"]]
        real = train_images[inputs["real"]], train_labels[inputs["real"]]
        learned = state["learned"]
        if not learned:  # input: real with a fixed learning rate: nothing to learn
            loss = meta_loss(self.teacher.generator, self.learner, inputs["init"], fixed, self.momentum, real)
            return state, {"Loss/Training": loss, "Hyperparameter/Lr": fixed["log_lr"].exp()}
        result = meta_hypergradient(self.teacher.generator, self.learner, inputs["init"], learned, fixed,
                                    self.momentum, real, truncation=self.truncation)
        gradient, norm = clip_by_global_norm(result.gradient, self.max_grad_norm)
        learned, optimiser = self.outer_optimiser.update(learned, gradient, state["optimiser"])
        lr = {**fixed, **learned}["log_lr"].exp()
        return ({"learned": learned, "fixed": state["fixed"], "optimiser": optimiser},
                {"Loss/Training": result.value, "Hypergradient/Norm": norm, "Hyperparameter/Lr": lr})

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
    """Peak bytes allocated during one hypergradient (the meta-loss forward
    and backward) of a digits-sized GTN with learned inputs: the memory the
    unroll grows with. Full unrolls grow linearly in K; ``truncation = T``
    bounds it by T. (For bench/RESULTS.md; from the profiler's allocation
    events, :class:`common.MemoryMeter`, on the CPU.)

        python -c "from commentaries import gtn; print(gtn.peak_saved_bytes(128, 8))"
    """
    from commentaries.common import MemoryMeter
    from models import MLP

    torch.manual_seed(seed)
    generator = Generator(noise_size, 10, (1, 8, 8))
    learned = {f"generator.{name}": p.detach() for name, p in generator.named_parameters()}
    learned.update(inputs=torch.randn(inner_steps, batch_size, noise_size), log_lr=torch.tensor(math.log(0.2)))
    fixed = {"labels": balanced_labels(inner_steps, batch_size, 10)}
    learner = MLP(hidden=[64], input_shape=(1, 8, 8), output_size=10)
    init = reset_weights(learner, torch.Generator().manual_seed(seed))
    real = torch.rand(256, 1, 8, 8), torch.randint(10, (256,))
    meter = MemoryMeter()
    with meter.measure():
        meta_hypergradient(generator, learner, init, learned, fixed, 0.5, real, truncation=truncation)
    return meter.peak
