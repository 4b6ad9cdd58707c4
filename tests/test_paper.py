"""The paper's settings, through the public entry points (``train.main`` and
the config files), so these tests hold whatever the engine inside looks like:

* Baydin with ``gradient_space: natural`` (the paper's code) raises a
  too-small learning rate by orders of magnitude, and steps with
  ``-∇L(w_t)·∇L(w_{t-1})``, checked against an independent float64
  simulation of the same steps; ``raw`` is the exact chain rule;
* ``batch_size: full`` sees every row at every step, with every validation
  setting;
* Random / Random_SteppedLR train on every row, Random_TrainingSetOnly on the
  training split only (the paper's meaning).
"""
import math
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import functional_call

import datasets
import models
import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OUTER_LR = 0.01


def diabetes(**network_weight):
    """A small full-batch regression (scikit-learn's bundled diabetes, MLP 10-8-1)
    in float64, with the learning rate stored as log10 and weight decay and
    momentum untransformed unless a test says otherwise."""
    return {
        "model": {"class": "MLP", "layer_sizes": [10, 8, 1], "activation_function": "ReLU"},
        "loss": {"class": "MSELoss"},
        "dataset": {"class": "Diabetes"},
        "network_weight": {"class": "SGD", "lr": -6.0, "weight_decay": 0.0, "momentum": 0.0,
                           **network_weight},
        "transformed_hyperparameters": {"lr": "10^"},
        "hyperparameter_clipping": {"lr": [-10.0, 0.0]},
        "batch_size": "full", "dtype": "float64", "device": "cpu", "log_interval": 1000,
        "seed": 3,
    }


def baydin(gradient_space, steps, **network_weight):
    return [diabetes(**network_weight), CONFIGS / "Baydin.yaml",
            {"hypergradient": {"class": "Baydin", "gradient_space": gradient_space},
             "hyperparameter": {"class": "SGD", "lr": OUTER_LR},
             "hyperparameter_steps": steps, "network_weight_steps": 1}]


def run(sources, tmp_path, **overrides):
    return train.main(sources, overrides, log_root=tmp_path, progress=False)


def test_baydin_yaml_is_the_papers_natural_space_hypergradient():
    text = (CONFIGS / "Baydin.yaml").read_text()
    assert "gradient_space: natural" in text and "paper" in text


def test_baydin_raises_a_too_small_learning_rate_a_hundredfold(tmp_path):
    """From lr 1e-6, a few hundred Baydin steps (outer SGD, lr 0.01, as a config
    sets it) raise the learning rate by orders of magnitude; the exact chain
    rule through 10^ (lr·ln10 times smaller) leaves it where it was."""
    natural = run(baydin("natural", 300), tmp_path)
    raw = run(baydin("raw", 300), tmp_path)
    assert natural["status"] == raw["status"] == "finished"
    assert natural["hyperparameters"]["lr"] >= 100 * 1e-6, natural["hyperparameters"]
    assert raw["hyperparameters"]["lr"] == pytest.approx(1e-6, rel=1e-3)
    assert natural["final"]["Loss/Test"] < raw["final"]["Loss/Test"]


def simulate(sources, steps, hypergradient):
    """The same run computed independently in float64: the initial weights
    rebuilt from the seed, full-batch SGD (momentum buffer, weight decay), and
    the outer SGD stepping log10 lr with ``hypergradient(v, g, b, lr)``, where
    ``v = ∇L(w_t)``, ``g = ∇L(w_{t-1})``, ``b`` the new momentum buffer."""
    cfg = sources[0]
    torch.manual_seed(cfg["seed"])
    data = datasets.load_data(cfg["dataset"], validation_proportion=0)
    model = models.build_model(cfg["model"], data).double()
    loss_function = models.build_loss(cfg["loss"])
    names = [name for name, _ in model.named_parameters()]
    inputs, targets = data.training_inputs.double(), data.training_targets.double()

    def gradient(weights):
        weights = [w.detach().requires_grad_() for w in weights]
        loss = loss_function(functional_call(model, dict(zip(names, weights)), (inputs,)), targets)
        return torch.autograd.grad(loss, weights)

    weights = [p.detach().clone() for p in model.parameters()]
    buffers = [torch.zeros_like(w) for w in weights]
    spec = cfg["network_weight"]
    raw_lr, weight_decay, momentum = spec["lr"], spec["weight_decay"], spec["momentum"]
    for _ in range(steps):
        lr = 10.0 ** raw_lr
        g = gradient(weights)
        buffers = [momentum * b + gi + weight_decay * w for b, gi, w in zip(buffers, g, weights)]
        weights = [w - lr * b for w, b in zip(weights, buffers)]
        v = gradient(weights)
        raw_lr = min(max(raw_lr - OUTER_LR * hypergradient(v, g, buffers, lr), -10.0), 0.0)
    return 10.0 ** raw_lr


def dot(a, b):
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def natural_space(v, g, b, lr):
    return -dot(v, g)                       # the paper's code: -∇L(w_t)·∇L(w_{t-1})


def chain_rule(v, g, b, lr):
    return -dot(v, b) * lr * math.log(10)   # d L(w_t) / d log10 lr


@pytest.mark.parametrize("steps", [1, 5])
def test_baydin_natural_hypergradient_is_minus_gradient_dot_gradient(steps, tmp_path):
    """Plain SGD: each step's hypergradient is -∇L(w_t)·∇L(w_{t-1}) (float64,
    against the independent simulation), and distinguishably not the chain rule."""
    sources = baydin("natural", steps, lr=-2.0)
    ours = run(sources, tmp_path)["hyperparameters"]["lr"]
    expected = simulate(sources, steps, natural_space)
    assert ours == pytest.approx(expected, rel=1e-10)
    assert abs(simulate(sources, steps, chain_rule) / expected - 1) > 1e-3


def test_baydin_natural_hypergradient_ignores_momentum_and_weight_decay(tmp_path):
    """As the paper's code: the loss gradients alone, not the update direction
    (momentum buffer, weight decay), enter -∇L(w_t)·∇L(w_{t-1})."""
    sources = baydin("natural", 5, lr=-2.0, weight_decay=0.01, momentum=0.5)
    ours = run(sources, tmp_path)["hyperparameters"]["lr"]
    assert ours == pytest.approx(simulate(sources, 5, natural_space), rel=1e-10)


def test_baydin_raw_is_the_exact_chain_rule(tmp_path):
    sources = baydin("raw", 5, lr=-2.0, weight_decay=0.01, momentum=0.5)
    ours = run(sources, tmp_path)["hyperparameters"]["lr"]
    assert ours == pytest.approx(simulate(sources, 5, chain_rule), rel=1e-10)


def test_baydin_natural_compiled_matches_eager(tmp_path):
    sources = baydin("natural", 5, lr=-2.0, momentum=0.5)
    eager = run(sources, tmp_path)["hyperparameters"]["lr"]
    compiled = run(sources, tmp_path, compile=True)["hyperparameters"]["lr"]
    assert compiled == pytest.approx(eager, rel=1e-9)


@pytest.mark.parametrize("overrides, message", [
    ({"hypergradient.gradient_space": "log"}, "gradient_space"),
    ({"hypergradient.gradient_space": "natural",
      "optimised_hyperparameters": ["lr", "weight_decay"]}, "gradient_space"),
], ids=["unknown-value", "natural-beyond-lr"])
def test_baydin_bad_gradient_space_is_one_line(overrides, message, tmp_path, capsys):
    source = tmp_path / "problem.yaml"
    source.write_text(yaml.safe_dump(diabetes()))
    arguments = ["-c", str(source), str(CONFIGS / "Baydin.yaml"), "-q", "-l", str(tmp_path),
                 "--set", *[f"{k}={v}" for k, v in overrides.items()]]
    with pytest.raises(SystemExit) as exit_info:
        train.cli(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error and message in error, error
    assert "hypergradient" in error


# ------------------------------------------------------------------ full batch

def logged(run_dir, tag):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


VALIDATION_SETTINGS = {
    "split": {},
    "no-validation-split": {"validation_proportion": 0},
    "folded-into-training": {"fold_validation_into_training": True},
}


@pytest.mark.parametrize("setting", VALIDATION_SETTINGS)
def test_full_batch_sees_every_row_at_every_step(setting, tmp_path, uci_available):
    """UCI energy as configured (batch_size: full) with the learning rate at
    exactly 0, so the weights never move: the training loss of every step's
    batch then equals the loss over the whole training split (and the
    validation batch's the whole validation split's) only if every step saw
    every row. (Before batch_size: full, energy's 614-row batches saw 614 of
    692 rows without a validation split.)"""
    overrides = {"transformed_hyperparameters.lr": None, "network_weight.lr": 0.0,
                 "hyperparameter_steps": 6, "network_weight_steps": 1, "log_interval": 1,
                 "dtype": "float64", "device": "cpu", **VALIDATION_SETTINGS[setting]}
    results = run([CONFIGS / "uci_energy.yaml", CONFIGS / "Random_Validation.yaml"], tmp_path,
                  **{**overrides, "validation_evaluation": "minibatch"})
    training = logged(results["run_dir"], "Loss/Training")
    validation = logged(results["run_dir"], "Loss/Validation")
    assert len(training) == len(validation) == 6  # every weight step
    # TensorBoard stores float32: agreement to its rounding, while a batch that
    # misses rows is off by far more (checked below)
    assert training == pytest.approx([results["final"]["Loss/Training"]] * 6, rel=1e-6)
    assert validation == pytest.approx([results["final"]["Loss/Validation"]] * 6, rel=1e-6)
    minibatch = run([CONFIGS / "uci_energy.yaml", CONFIGS / "Random_Validation.yaml"], tmp_path,
                    **{**overrides, "batch_size": 300})
    assert logged(minibatch["run_dir"], "Loss/Training") != pytest.approx(training, rel=1e-4)


def test_batch_size_full_is_in_every_uci_file():
    files = sorted(CONFIGS.glob("uci_*.yaml"))
    assert len(files) == 8
    for path in files:
        assert yaml.safe_load(path.read_text())["batch_size"] == "full", path


@pytest.mark.parametrize("value", [0, -1, "all", 2.5, True])
def test_bad_batch_size_is_one_line(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.cli(["-c", str(CONFIGS / "digits.yaml"), str(CONFIGS / "Random.yaml"), "-q",
                   "-l", str(tmp_path), "--set", f"batch_size={value}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "batch_size" in error and "full" in error, error


# ------------------------------------------------------ Random's training data

@pytest.mark.parametrize("algorithm, rows", [
    ("Random", "all"), ("Random_SteppedLR", "all"), ("Random_TrainingSetOnly", "split"),
    ("Random_Validation", "split"), ("Random_Validation_BayesOpt", "split")])
def test_random_variants_train_on_the_papers_rows(algorithm, rows, tmp_path):
    """Random and Random_SteppedLR train on every training and validation row
    (validation_proportion: 0 in their files, as the paper's); the other
    Random variants keep the dataset's split and train on its training part.
    With lr exactly 0 the final training loss is the initial model's over the
    rows it trained on, compared with an independent evaluation."""
    cfg = diabetes()
    torch.manual_seed(cfg["seed"])
    every = datasets.load_data(cfg["dataset"], validation_proportion=0)
    model = models.build_model(cfg["model"], every).double()
    loss_function = models.build_loss(cfg["loss"])
    with torch.no_grad():
        def loss(count):
            inputs, targets = every.training_inputs[:count], every.training_targets[:count]
            return float(loss_function(model(inputs.double()), targets.double()))
        split = len(datasets.load_data(cfg["dataset"], validation_proportion=0.2).training_inputs)
        expected = {"all": loss(len(every.training_inputs)), "split": loss(split)}
    assert expected["all"] != pytest.approx(expected["split"], rel=1e-6)
    # the dataset file gives a split; the algorithm file decides what trains
    dataset_file = {**diabetes(), "validation_proportion": 0.2}
    results = run([dataset_file, CONFIGS / f"{algorithm}.yaml"], tmp_path,
                  **{"transformed_hyperparameters.lr": None, "network_weight.lr": 0.0,
                     "hyperparameter_steps": 1})
    assert results["final"]["Loss/Training"] == pytest.approx(expected[rows], rel=1e-12)


def test_diverging_per_weight_learning_rates_end_as_diverged(tmp_path):
    """A per-weight learning-rate run that diverges is recorded as diverged,
    not failed on logging the non-finite learning rates' histogram (one of
    20 UCI-energy Ours_HDLR_Momentum runs did)."""
    results = run([CONFIGS / "diabetes.yaml", CONFIGS / "Ours_HDLR_Momentum.yaml"], tmp_path,
                  **{"network_weight.lr": 1.5, "hyperparameter_clipping.lr": [-10.0, 2.0],
                     "hyperparameter_steps": 50, "log_interval": 10, "device": "cpu"})
    assert results["status"] == "diverged"
    assert results["network_weight_steps_done"] < 500
