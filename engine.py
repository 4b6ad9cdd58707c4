"""The training engine: weight steps, hyperparameter steps, evaluation.

One *hyperparameter step* is ``network_weight_steps`` weight updates followed
by one update of the hyperparameters from a hypergradient. Weight updates run
without an autograd graph except the last ``method.differentiable_steps`` of
each hyperparameter step, which the method needs (K for unrolled
differentiation; for the implicit methods with SGD, only the training
gradient of the last update, since the rest of its Jacobian is closed-form).
Data sits on the device as tensors and batches are gathered by index; nothing
in the loop waits for the host.

All state needed to continue a run bit for bit (weights, optimiser state,
hyperparameters, outer optimiser, samplers, random generators, counters) is in
:meth:`Trainer.state_dict`.
"""
import copy
import functools
import math

import torch
from torch.func import functional_call

import hypergradients
from compiled import CompiledSteps
from errors import UserError
from hyperparameters import TRANSFORMS, Hyperparameters
from optimisers import HYPERPARAMETER_OPTIMISERS, OPTIMISERS
from registry import closest


class Sampler:
    """Endless minibatches of indices: a fresh permutation every epoch, the
    incomplete last batch dropped. ``None`` means "the whole split" (batch at
    least as large as the split, or ``batch_size: full``), which avoids a
    gather per step."""

    def __init__(self, size, batch_size, seed, device):
        batch_size = size if batch_size == "full" else batch_size
        self.size, self.batch_size, self.device = size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = None, 0

    def next(self):
        if self.batch_size >= self.size:
            return None
        if self.order is None or self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator).to(self.device)
            self.position = 0
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


class Problem:
    """Model + loss + data as pure functions of a tuple of weight tensors."""

    def __init__(self, model, loss_function, data):
        self.model, self.loss_function, self.data = model, loss_function, data
        self.names = [name for name, _ in model.named_parameters()]
        self.parameters = list(model.parameters())
        self.buffers = dict(model.named_buffers())

    def initial_weights(self):
        return tuple(p.detach().clone() for p in self.model.parameters())

    def predict(self, weights, inputs):
        if all(w is p for w, p in zip(weights, self.parameters)):
            return self.model(inputs)
        return functional_call(self.model, (dict(zip(self.names, weights)), self.buffers),
                               (inputs,))

    def split(self, name):
        data = self.data
        return getattr(data, f"{name}_inputs"), getattr(data, f"{name}_targets")

    def batch(self, split, indices):
        inputs, targets = self.split(split)
        if indices is None:
            return inputs, targets
        # index_select: half the cost of advanced indexing for a minibatch of rows
        return inputs.index_select(0, indices), targets.index_select(0, indices)

    def install(self, weights):
        """Make ``weights`` the module's own parameters (sharing storage) and
        return those parameters: calling the module directly is cheaper than
        ``functional_call``'s per-call module swapping. Never call while a
        graph that saved the parameters is still in use."""
        for parameter, weight in zip(self.parameters, weights):
            parameter.data = weight
        return tuple(self.parameters)

    def loss_and_grads(self, weights, batch):
        """Loss and gradient for an ordinary weight step, with no graph kept."""
        self.install(weights)
        inputs, targets = batch
        loss = self.loss_function(self.model(inputs), targets)
        return loss.detach(), torch.autograd.grad(loss, self.parameters)

    @functools.cached_property
    def validation_model(self):
        """A twin of the model (same buffers) for validation gradients taken
        while a recorded window holds the model's own parameters."""
        twin = copy.deepcopy(self.model)
        for module, twin_module in zip(self.model.modules(), twin.modules()):
            twin_module._buffers.update(module._buffers)  # share running statistics
            for name, parameter in module._parameters.items():
                if parameter is not None:
                    twin_module._parameters[name].data = parameter.data
        return twin

    def validation_gradient(self, weights, batch):
        """``∇L(weights)`` on ``batch`` through the twin model, with no graph kept."""
        parameters = list(self.validation_model.parameters())
        for parameter, weight in zip(parameters, weights):
            parameter.data = weight
        inputs, targets = batch
        loss = self.loss_function(self.validation_model(inputs), targets)
        return torch.autograd.grad(loss, parameters)

    def loss(self, weights, batch):
        inputs, targets = batch
        return self.loss_function(self.predict(weights, inputs), targets)

    @torch.no_grad()
    def evaluate(self, weights, split, chunk_size, indices=None):
        """Mean loss and task metrics over a split (or a batch of it), as
        0-d device tensors: no host sync here."""
        inputs, targets = self.batch(split, indices)
        self.model.eval()
        total_loss, total_unnormalised, total_correct = 0.0, 0.0, 0.0
        for start in range(0, len(inputs), chunk_size):
            chunk_inputs = inputs[start:start + chunk_size]
            chunk_targets = targets[start:start + chunk_size]
            outputs = self.predict(weights, chunk_inputs)
            count = len(chunk_inputs)
            total_loss = total_loss + self.loss_function(outputs, chunk_targets) * count
            if self.data.task == "regression" and self.data.target_scale is not None:
                error = (outputs - chunk_targets) * self.data.target_scale
                total_unnormalised = total_unnormalised + (error ** 2).mean() * count
            if self.data.task == "classification":
                total_correct = total_correct + (outputs.argmax(-1) == chunk_targets).sum()
        self.model.train()
        size = len(inputs)
        metrics = {"Loss": total_loss / size}
        if self.data.task == "regression" and self.data.target_scale is not None:
            metrics["Unnormalised_Loss"] = total_unnormalised / size
        if self.data.task == "classification":
            metrics["Accuracy"] = total_correct / size
        if self.data.task == "language_model":
            metrics["Perplexity"] = torch.exp(metrics["Loss"])
        return metrics


def build_weight_optimiser(spec, where):
    """``network_weight: {class: SGD, lr: .., momentum: .., lr_multiplier: ..}``
    -> (optimiser, initial raw hyperparameters, lr multiplier or None)."""
    optimiser = OPTIMISERS.get(spec.get("class"), f"{where}.class")()
    values = {key: value for key, value in spec.items() if key not in ("class", "lr_multiplier")}
    for key in values:
        if key not in optimiser.hyperparameters:
            valid = ", ".join(f"{k}={v}" for k, v in optimiser.hyperparameters.items())
            raise UserError(f"{where}: unknown hyperparameter '{key}' for {spec['class']}; "
                            f"valid (with natural defaults): {valid}, lr_multiplier")
    multiplier = spec.get("lr_multiplier")
    if multiplier is not None and (isinstance(multiplier, bool)
                                   or not isinstance(multiplier, (int, float)) or multiplier <= 0):
        raise UserError(f"{where}.lr_multiplier: must be a positive number, got {multiplier!r}")
    return optimiser, values, multiplier


def default_raw(optimiser, transforms):
    """Raw values for hyperparameters the config leaves out: the optimiser's
    natural defaults mapped into each transform's space (a natural 0 under
    ``10^``/``exp``/``sigmoid`` becomes -30, i.e. 1e-30 or 1e-13)."""
    raw = {}
    for name, natural in optimiser.hyperparameters.items():
        inverse = TRANSFORMS[transforms.get(name)][1]
        try:
            raw[name] = inverse(natural)
        except (ValueError, ZeroDivisionError):
            raw[name] = -30.0
    return raw


class Trainer:
    """Weights, hyperparameters and the loop that updates both."""

    def __init__(self, config, problem, device, dtype):
        self.config, self.problem = config, problem
        self.network_weight_steps = config["network_weight_steps"]
        self.optimiser, configured, self.lr_multiplier = build_weight_optimiser(
            config["network_weight"], config.where("network_weight"))
        for list_key in ("optimised_hyperparameters", "high_dimensional_hyperparameters",
                         "transformed_hyperparameters", "hyperparameter_clipping"):
            for name in config[list_key]:
                if name not in self.optimiser.hyperparameters:
                    raise UserError(
                        f"{config.where(list_key)}: '{name}' is not a hyperparameter of "
                        f"{config['network_weight']['class']}"
                        f"{closest(name, self.optimiser.hyperparameters)}; valid: "
                        f"{', '.join(self.optimiser.hyperparameters)}")
        initial = default_raw(self.optimiser, config["transformed_hyperparameters"])
        initial.update(configured)
        self.weights = problem.initial_weights()
        self.hyperparameters = Hyperparameters(
            initial, transforms=config["transformed_hyperparameters"],
            clipping=config["hyperparameter_clipping"],
            optimised=config["optimised_hyperparameters"],
            high_dimensional=config["high_dimensional_hyperparameters"],
            weight_shapes=[w.shape for w in self.weights], device=device, dtype=dtype,
            where=config.where("network_weight"))
        self.method = hypergradients.METHODS.build(config["hypergradient"],
                                                   config.where("hypergradient"))
        if hasattr(self.method, "check_hyperparameters"):
            self.method.check_hyperparameters(self.hyperparameters, config.where("hypergradient"))
        leaves = self.hyperparameters.leaves()
        self.outer = (HYPERPARAMETER_OPTIMISERS.build(config["hyperparameter"],
                                                      config.where("hyperparameter"),
                                                      params=leaves) if leaves else None)
        if leaves and isinstance(self.method, hypergradients.NoHypergradient):
            raise UserError(f"{config.where('optimised_hyperparameters')}: hyperparameters are "
                            f"optimised but hypergradient.class is None")
        self.state = self.optimiser.init(self.weights)
        self.initial_weights, self.initial_state = self.weights, self.state
        self.compiled = self.build_compiled() if config["compile"] else None
        seed = config["seed"]
        batch_size = config["batch_size"]
        self.training_sampler = Sampler(len(problem.data.training_inputs), batch_size,
                                        seed + 1, device)
        validation_size = len(problem.split(self.validation_split)[0])
        self.validation_sampler = Sampler(validation_size, batch_size, seed + 2, device)
        # Minibatches for logged validation losses, apart from the hypergradient's.
        self.log_sampler = Sampler(validation_size, batch_size, seed + 3, device)
        self.hyperparameter_step = 0
        self.weight_step = 0
        self.last_training_loss = torch.full((), math.nan, device=device)
        self.last_hypergradients = {}

    def build_compiled(self):
        uses_hypergradients = self.method.differentiable_steps(self.network_weight_steps) > 0
        if uses_hypergradients and not self.method.linearises(self.optimiser):
            raise UserError(
                f"{self.config.where('compile')}: true supports fixed hyperparameters and the "
                f"closed-form implicit methods (Implicit, Baydin) with SGD; "
                f"{self.config['hypergradient']['class']} with "
                f"{self.config['network_weight']['class']} runs with compile: false")
        return CompiledSteps(self.problem, self.optimiser, self.config.where("compile"),
                             method=self.method, hyperparameters=self.hyperparameters,
                             apply_hypergradients=self.apply_hypergradients,
                             stateful=[self.hyperparameters] + ([self.outer] if self.outer else []))

    @property
    def validation_split(self):
        """Validation data, or the training data when the split is empty
        (``validation_proportion: 0``, as in Baydin et al.'s setting)."""
        return "validation" if len(self.problem.data.validation_inputs) else "training"

    def training_batch(self):
        return self.problem.batch("training", self.training_sampler.next())

    def validation_batch(self):
        return self.problem.batch(self.validation_split, self.validation_sampler.next())

    def weight_step_(self, natural):
        """One ordinary weight update: no graph is kept."""
        if self.compiled is not None:
            self.weights, self.state, loss = self.compiled.weight_step(
                self.weights, self.state, natural, *self.training_batch())
        else:
            loss, grads = self.problem.loss_and_grads(self.weights, self.training_batch())
            with torch.no_grad():
                self.weights, self.state = self.optimiser.update(self.weights, grads,
                                                                 self.state, natural)
        self.last_training_loss = loss
        self.weight_step += 1

    def step(self):
        """One hyperparameter step: the weight updates, then the hyperparameters."""
        recorded = self.method.differentiable_steps(self.network_weight_steps)
        natural = self.hyperparameters.natural_detached()
        for _ in range(self.network_weight_steps - recorded):
            self.weight_step_(natural)
        if recorded:
            self.update_hyperparameters(recorded)
        if self.lr_multiplier is not None:
            self.hyperparameters.scale_("lr", self.lr_multiplier)
        if self.config["reset_model_after_hyperparameter_update"]:
            self.weights, self.state = self.initial_weights, self.initial_state
        self.hyperparameter_step += 1

    def update_hyperparameters(self, recorded):
        batches = [self.training_batch() for _ in range(recorded)]
        validation_batch = self.validation_batch()
        if self.compiled is not None and self.compiled.hyperparameter_step is not None:
            # one fused graph: see compiled.fused_hyperparameter_step
            self.weights, self.state, self.last_training_loss, self.last_hypergradients = (
                self.compiled.hyperparameter_step(self.weights, self.state, *batches[0],
                                                  *validation_batch))
        else:
            grads = self.hypergradient_from_window(batches, validation_batch)
            self.last_hypergradients = self.apply_hypergradients(grads)
        self.weight_step += recorded

    def apply_hypergradients(self, grads):
        """The outer optimiser's step and the clipping; returns the summary
        logged as ``Hypergradient/*``."""
        self.outer.step(grads)
        self.hyperparameters.clip_()
        return self.summarise_hypergradients(grads)

    def hypergradient_from_window(self, batches, validation_batch):
        """Record the window, take the method's hypergradient, and move the
        weights to the window's end."""
        if self.compiled is not None:
            window = self.compiled_window(batches[0], validation_batch)
        else:
            window = hypergradients.unroll(
                self.problem.install(self.weights), self.state, self.optimiser,
                self.hyperparameters, self.problem.loss, batches,
                linearise=self.method.linearises(self.optimiser))
            window.validation_gradient = (
                lambda weights: self.problem.validation_gradient(weights, validation_batch))
        window.validation_loss = lambda weights: self.problem.loss(weights, validation_batch)
        grads = self.method.hypergradient(window)
        self.weights = tuple(w.detach() for w in window.end)
        self.state = {key: (tuple(v.detach() for v in value) if isinstance(value, tuple)
                            else value.detach()) for key, value in window.state.items()}
        self.last_training_loss = window.training_losses[-1]
        return grads

    def compiled_window(self, batch, validation_batch):
        """The linearised window of :meth:`update_hyperparameters` from the
        compiled gradient and Hessian-vector product."""
        compiled, weights = self.compiled, self.weights
        window = hypergradients.linearised(
            weights, self.state, self.optimiser, self.hyperparameters,
            gradient=lambda w: compiled.gradient(w, *batch),
            hessian_product=lambda vector: compiled.hessian_product(weights, vector, *batch))
        window.validation_gradient = lambda w: compiled.gradient(w, *validation_batch)[1]
        return window

    def warm_up(self):
        """Compile (``compile: true``) before the timed loop, on copies of the
        state and batches of the right shapes: samplers and state untouched."""
        if self.compiled is None:
            return 0.0
        batches = []
        for split, sampler in (("training", self.training_sampler),
                               (self.validation_split, self.validation_sampler)):
            indices = (torch.arange(sampler.batch_size, device=self.weights[0].device)
                       if sampler.batch_size < sampler.size else None)
            batches.append(self.problem.batch(split, indices))
        return self.compiled.warm_up(self.weights, self.state,
                                     self.hyperparameters.natural_detached(), batches,
                                     hessian=self.method.differentiable_steps(
                                         self.network_weight_steps) > 0)

    def summarise_hypergradients(self, grads):
        """One number per optimised hyperparameter (the sum over weights for
        per-weight ones, which equals the scalar hypergradient when they agree)."""
        summary, position = {}, 0
        for name in self.hyperparameters.optimised:
            value = self.hyperparameters.raw[name]
            count = len(value) if isinstance(value, tuple) else 1
            summary[name] = sum(g.sum() for g in grads[position:position + count])
            position += count
        return summary

    def samplers(self):
        return (self.training_sampler, self.validation_sampler, self.log_sampler)

    def evaluate(self, split, indices=None):
        return self.problem.evaluate(self.weights, split, self.config["evaluation_batch_size"],
                                     indices)

    def state_dict(self):
        return {
            "weights": self.weights, "state": self.state,
            "buffers": {k: v.clone() for k, v in self.problem.buffers.items()},
            "initial_weights": self.initial_weights, "initial_state": self.initial_state,
            "hyperparameters": self.hyperparameters.state_dict(),
            "outer": self.outer.state_dict() if self.outer else None,
            "samplers": [sampler.state_dict() for sampler in self.samplers()],
            "hyperparameter_step": self.hyperparameter_step, "weight_step": self.weight_step,
            "last_training_loss": self.last_training_loss,
        }

    def load_state_dict(self, state):
        self.weights, self.state = state["weights"], state["state"]
        for name, value in state["buffers"].items():
            self.problem.buffers[name].copy_(value)
        self.initial_weights, self.initial_state = state["initial_weights"], state["initial_state"]
        self.hyperparameters.load_state_dict(state["hyperparameters"])
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
        for sampler, sampler_state in zip(self.samplers(), state["samplers"]):
            sampler.load_state_dict(sampler_state)
        self.hyperparameter_step = state["hyperparameter_step"]
        self.weight_step = state["weight_step"]
        self.last_training_loss = state["last_training_loss"]
