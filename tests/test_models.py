"""models.py: every model's forward shape, and Hessian-vector products through
``torch.func.functional_call`` (reverse-over-reverse and forward-over-reverse,
checked against each other and against finite differences of gradients);
BatchNorm buffers under transforms; losses; shipped dataset configs build."""
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch.func import functional_call, grad, jvp

import datasets
import models
from errors import UserError

REPO = Path(__file__).resolve().parent.parent


def fake_data(input_shape, output_size, task="classification"):
    """A Data with the right shapes for building models (no files needed)."""
    empty = torch.zeros(0)
    return datasets.Data(empty, empty, empty, empty, empty, empty, task=task, output_size=output_size,
                         input_shape=tuple(input_shape), target_scale=None, name="fake")


def loss_fn(model, params, buffers, inputs, targets, loss):
    return loss(functional_call(model, (params, buffers), (inputs,)), targets)


def hessian_vector_products(model, inputs, targets, loss, seed=0):
    """H v by reverse-over-reverse (autograd double backward) and by
    forward-over-reverse (torch.func.jvp of torch.func.grad)."""
    params = {name: value.detach() for name, value in model.named_parameters()}
    buffers = dict(model.named_buffers())
    generator = torch.Generator().manual_seed(seed)
    vector = {name: torch.randn(value.shape, generator=generator, dtype=value.dtype)
              for name, value in params.items()}
    leaves = {name: value.clone().requires_grad_() for name, value in params.items()}
    gradients = torch.autograd.grad(loss_fn(model, leaves, buffers, inputs, targets, loss),
                                    list(leaves.values()), create_graph=True)
    dot = sum((gradient * vector[name]).sum() for gradient, name in zip(gradients, leaves))
    reverse = dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()))))
    gradient_function = grad(lambda p: loss_fn(model, p, buffers, inputs, targets, loss))
    _, forward = jvp(gradient_function, (params,), (vector,))
    return reverse, forward, params, vector, gradient_function


def assert_close(first, second, tolerance):
    for name in first:
        scale = 1.0 + second[name].abs().max().item()
        assert (first[name] - second[name]).abs().max().item() <= tolerance * scale, name


CROSS_ENTROPY = models.build_loss({"class": "CrossEntropyLoss"})
DIGITS = fake_data((1, 8, 8), 10)


@pytest.mark.parametrize("spec", [
    {"class": "MLP", "layer_sizes": [64, 20, 10]},
    {"class": "MultiLayerPerceptron", "layer_sizes": [64, 20, 20, 10], "activation_function": "Tanh",
     "batch_norm": True},
    {"class": "MLP", "layer_sizes": [64, 20, 10], "activation_function": "GELU"},
    {"class": "MLP", "layer_sizes": [64, 20, 10], "activation_function": "Sigmoid"},
    {"class": "TwoBlockCNN", "channels": [4, 8]},
    {"class": "FourBlockCNN", "channels": [4, 4, 8, 8]},
    {"class": "MLP", "hidden": [16], "activation_function": "ELU"},  # the teaching configs' form
    {"class": "CNN", "width": 4, "activation_function": "Tanh"},
    {"class": "Linear"},
], ids=["MLP", "MLP-BatchNorm-Tanh", "MLP-GELU", "MLP-Sigmoid", "TwoBlockCNN", "FourBlockCNN", "MLP-hidden-ELU",
        "CNN", "Linear"])
def test_image_models_forward_and_double_backward(spec):
    torch.manual_seed(0)
    model = models.build_model(spec, DIGITS).double()
    inputs = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    assert model(inputs).shape == (6, 10)
    reverse, forward, params, vector, gradient_function = hessian_vector_products(
        model, inputs, targets, CROSS_ENTROPY)
    assert_close(reverse, forward, 1e-8)
    # Central finite differences of the gradient along v.
    epsilon = 1e-5
    plus = gradient_function({k: p + epsilon * vector[k] for k, p in params.items()})
    minus = gradient_function({k: p - epsilon * vector[k] for k, p in params.items()})
    finite = {k: (plus[k] - minus[k]) / (2 * epsilon) for k in params}
    assert_close(reverse, finite, 1e-5)


def test_resnets_forward_shapes_and_resnet18_double_backward():
    torch.manual_seed(0)
    cifar = fake_data((3, 16, 16), 7)
    inputs, targets = torch.randn(2, 3, 16, 16), torch.tensor([1, 6])
    resnet18 = models.build_model({"class": "ResNet18", "cifar_stem": True}, cifar)
    assert resnet18.conv1.kernel_size == (3, 3) and isinstance(resnet18.maxpool, torch.nn.Identity)
    assert not any(getattr(module, "inplace", False) for module in resnet18.modules())
    assert resnet18(inputs).shape == (2, 7)
    reverse, forward, *_ = hessian_vector_products(resnet18, inputs, targets, CROSS_ENTROPY)
    assert_close(reverse, forward, 1e-3)
    assert all(torch.isfinite(value).all() for value in reverse.values())
    resnet34 = models.build_model({"class": "ResNet34"}, fake_data((1, 32, 32), 3))
    assert resnet34.conv1.in_channels == 1 and resnet34(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_lstm_language_model_shapes_tied_weights_and_double_backward():
    torch.manual_seed(0)
    vocabulary = fake_data((5,), 30, task="language_model")
    model = models.build_model({"class": "LSTMLanguageModel", "embedding_size": 12, "hidden_size": 12,
                                "dropout": 0.0}, vocabulary).double()
    assert model.decoder.weight is model.embedding.weight
    assert "decoder.weight" not in dict(model.named_parameters())  # tied: one parameter
    tokens, targets = torch.randint(0, 30, (3, 5)), torch.randint(0, 30, (3, 5))
    assert model(tokens).shape == (3, 5, 30)
    reverse, forward, *_ = hessian_vector_products(model, tokens, targets, CROSS_ENTROPY)
    assert_close(reverse, forward, 1e-8)


def test_lstm_layer_matches_torch_lstm():
    """The hand-written recurrence computes exactly nn.LSTM's equations."""
    torch.manual_seed(0)
    layer = models.LSTMLayer(4, 6).double()
    reference = torch.nn.LSTM(4, 6, batch_first=True).double()
    with torch.no_grad():
        reference.weight_ih_l0.copy_(layer.input_weights.weight)
        reference.bias_ih_l0.copy_(layer.input_weights.bias)
        reference.weight_hh_l0.copy_(layer.hidden_weights.weight)
        reference.bias_hh_l0.zero_()
    inputs = torch.randn(2, 7, 4, dtype=torch.float64)
    assert torch.allclose(layer(inputs), reference(inputs)[0], atol=1e-12)


def test_fused_lstm_option_computes_the_same_model():
    """``fused: true`` (nn.LSTM, cuDNN on GPUs) is the same function as the default."""
    data = fake_data((6,), 25, task="language_model")
    plain = models.build_model({"class": "LSTMLanguageModel", "embedding_size": 8, "hidden_size": 8}, data)
    fused = models.build_model({"class": "LSTMLanguageModel", "embedding_size": 8, "hidden_size": 8,
                                "fused": True}, data)
    with torch.no_grad():
        fused.embedding.weight.copy_(plain.embedding.weight)
        fused.decoder.bias.copy_(plain.decoder.bias)
        for index, layer in enumerate(plain.layers):
            getattr(fused.lstm, f"weight_ih_l{index}").copy_(layer.input_weights.weight)
            getattr(fused.lstm, f"bias_ih_l{index}").copy_(layer.input_weights.bias)
            getattr(fused.lstm, f"weight_hh_l{index}").copy_(layer.hidden_weights.weight)
            getattr(fused.lstm, f"bias_hh_l{index}").zero_()
    tokens = torch.randint(0, 25, (3, 6))
    assert torch.allclose(plain.eval()(tokens), fused.eval()(tokens), atol=1e-5)


def test_lstm_dropout_and_untied_options():
    model = models.build_model({"class": "LSTMLanguageModel", "embedding_size": 8, "hidden_size": 10,
                                "num_layers": 3, "tie_weights": False}, fake_data((4,), 20))
    assert len(model.layers) == 3 and model.decoder.weight is not model.embedding.weight
    model.eval()
    tokens = torch.randint(0, 20, (2, 4))
    assert torch.equal(model(tokens), model(tokens))  # dropout off in eval
    with pytest.raises(UserError) as error:
        models.build_model({"class": "LSTMLanguageModel", "embedding_size": 8, "hidden_size": 10},
                           fake_data((4,), 20), where="configs/p.yaml: model")
    assert "configs/p.yaml: model" in str(error.value) and "tie_weights" in str(error.value)


def test_batch_norm_running_stats_update_in_eager_and_single_transform_only():
    torch.manual_seed(0)
    model = models.build_model({"class": "MLP", "layer_sizes": [64, 8, 10], "batch_norm": True}, DIGITS)
    inputs, targets = torch.randn(16, 1, 8, 8) + 3.0, torch.randint(0, 10, (16,))
    params = {name: value.detach() for name, value in model.named_parameters()}
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    # Single transform with buffers as inputs: a training step updates the statistics.
    grad(lambda p, b: loss_fn(model, p, b, inputs, targets, CROSS_ENTROPY))(params, buffers)
    assert buffers["layers.2.num_batches_tracked"].item() == 1
    assert not torch.equal(buffers["layers.2.running_mean"], torch.zeros(8))
    # Nested (Hessian-vector product): batch statistics, buffers untouched.
    before = {name: value.clone() for name, value in buffers.items()}
    gradient_function = grad(lambda p: loss_fn(model, p, buffers, inputs, targets, CROSS_ENTROPY))
    jvp(gradient_function, (params,), ({k: torch.ones_like(v) for k, v in params.items()},))
    assert all(torch.equal(before[name], buffers[name]) for name in buffers)
    # Eval mode uses the running statistics.
    model.eval()
    assert model(inputs).shape == (16, 10)


def test_mlp_layer_size_mismatch_is_one_line_naming_where():
    uci = fake_data((13,), 1, task="regression")
    with pytest.raises(UserError) as error:
        models.build_model({"class": "MLP", "layer_sizes": [8, 50, 1]}, uci, where="configs/uci_boston.yaml: model")
    message = str(error.value)
    assert "\n" not in message and "configs/uci_boston.yaml: model" in message
    assert "layer_sizes[0] is 8" in message and "13 features" in message
    with pytest.raises(UserError, match=r"layer_sizes\[-1\] is 2 but the dataset needs 1 outputs"):
        models.build_model({"class": "MLP", "layer_sizes": [13, 50, 2]}, uci)


def test_bad_model_specs_are_one_line_user_errors():
    cases = [({"class": "MLPP", "layer_sizes": [64, 10]}, "did you mean 'MLP'"),
             ({"class": "MLP", "layer_sizes": [64, 10], "activation": "ReLU"}, "unknown option 'activation'"),
             ({"class": "MLP", "layer_sizes": [64, 10], "activation_function": "Swish"}, "Swish"),
             ({"class": "MLP"}, "give either layer_sizes or hidden"),
             ({"class": "TwoBlockCNN", "channels": [4, 8, 16]}, "channels needs 2 widths"),
             ({"class": "TwoBlockCNN", "in_channels": 3}, None)]  # explicit values are not overridden
    for spec, fragment in cases:
        if fragment is None:
            assert models.build_model(spec, DIGITS).features[0].in_channels == 3
            continue
        with pytest.raises(UserError) as error:
            models.build_model(spec, DIGITS, where="cfg: model")
        assert "\n" not in str(error.value) and "cfg: model" in str(error.value)
        assert fragment in str(error.value), str(error.value)


def test_losses_match_their_definitions():
    outputs, targets = torch.randn(4, 3, 11), torch.randint(0, 11, (4, 3))
    expected = torch.nn.functional.cross_entropy(outputs.permute(0, 2, 1), targets)
    assert torch.allclose(CROSS_ENTROPY(outputs, targets), expected)
    flat_outputs, flat_targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    manual = -torch.log_softmax(flat_outputs, dim=1)[torch.arange(5), flat_targets].mean()
    assert torch.allclose(CROSS_ENTROPY(flat_outputs, flat_targets), manual)
    mse = models.build_loss({"class": "MSELoss"})
    assert mse(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]])).item() == pytest.approx(5.0)
    with pytest.raises(UserError, match="unknown loss class"):
        models.build_loss({"class": "L1"}, where="cfg: loss")


@pytest.mark.parametrize("rows,classes,path", [(50, 10, "usual"), (4096, 10, "classes-second"),
                                               (600, 2, "classes-second"), (300, 32, "usual")],
                         ids=["minibatch", "evaluation-chunk", "two-classes", "many-classes"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "label-smoothing"])
def test_cross_entropy_takes_the_fast_order_and_gives_the_same_loss_and_gradient(rows, classes, path, smoothing):
    loss = models.build_loss({"class": "CrossEntropyLoss", "label_smoothing": smoothing})
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(3, rows, classes, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, classes, (rows,), generator=generator)
    with torch.profiler.profile(record_shapes=True) as profile:
        gradients, values = torch.func.vmap(torch.func.grad_and_value(loss), in_dims=(0, None))(logits, targets)
    for member in range(3):
        expected = logits[member].clone().requires_grad_()
        reference = torch.nn.functional.cross_entropy(expected, targets, label_smoothing=smoothing)
        reference.backward()
        torch.testing.assert_close(values[member], reference.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(gradients[member], expected.grad, rtol=1e-12, atol=1e-15)
    shapes = [event.input_shapes[0] for event in profile.events() if event.name == "aten::_log_softmax"]
    order = [1, classes, rows] if path == "classes-second" else [rows, classes]  # a member's, as vmap sees it
    assert shapes and all(shape == order for shape in shapes), (path, shapes)


DATASET_CONFIGS = sorted(  # dataset/model files; teaching data files have no `dataset` section
    path.name for path in (REPO / "configs").glob("*.yaml")
    if path.name[0].islower() and "dataset" in (yaml.safe_load(path.read_text()) or {}))
# Shapes of the datasets that need downloads, so their configs are checked offline.
DOWNLOADED_SHAPES = {"FashionMNIST": ((1, 28, 28), 10, "classification"),
                     "MNIST": ((1, 28, 28), 10, "classification"),
                     "CIFAR10": ((3, 32, 32), 10, "classification"),
                     "CIFAR100": ((3, 32, 32), 100, "classification"),
                     "PennTreebank": ((35,), 10000, "language_model")}


def config_data(config, config_name):
    """The config's real data where it is available offline, else fake shapes
    (after checking the config's dataset options against the loader)."""
    dataset_class = config["dataset"]["class"]
    if dataset_class not in DOWNLOADED_SHAPES:
        root = Path(os.environ.get("HYPERGRAD_DATA") or REPO.parent / "shared" / "data")
        if dataset_class.startswith("UCI_") and not (root / "uci").is_dir():
            pytest.skip("no UCI data; set HYPERGRAD_DATA")
        data = datasets.load_data(config["dataset"], validation_proportion=config["validation_proportion"],
                                  data_root=root, where=f"{config_name}: dataset")
        assert config["batch_size"] == "full" or config["batch_size"] <= len(data.training_inputs)
        return data
    options = {key: value for key, value in config["dataset"].items() if key != "class"}
    datasets.DATASETS.check_options(datasets.DATASETS.get(dataset_class), options, config_name,
                                    injected=("validation_proportion", "data_root"))
    return fake_data(*DOWNLOADED_SHAPES[dataset_class])


@pytest.mark.parametrize("config_name", DATASET_CONFIGS)
def test_dataset_configs_build_a_matching_model_and_loss(config_name):
    """Every shipped dataset config: its dataset options are valid, its model
    fits its data, and model + loss give a finite scalar on two examples."""
    config = yaml.safe_load((REPO / "configs" / config_name).read_text())
    data = config_data(config, config_name)
    spec = dict(config["model"])
    if data.task == "language_model":  # the 650-unit model is slow on CPU: check the wiring only
        spec.update(embedding_size=8, hidden_size=8)
    model = models.build_model(spec, data, where=f"{config_name}: model").eval()
    loss = models.build_loss(config["loss"], where=f"{config_name}: loss")
    if len(data.training_inputs):
        inputs, targets = data.training_inputs[:2], data.training_targets[:2]
    elif data.task == "language_model":
        inputs, targets = torch.zeros(2, *data.input_shape, dtype=torch.int64), torch.zeros(2, 35, dtype=torch.int64)
    else:
        inputs, targets = torch.zeros(2, *data.input_shape), torch.zeros(2, dtype=torch.int64)
    outputs = model(inputs)
    assert outputs.shape[-1] == data.output_size
    value = loss(outputs, targets)
    assert value.ndim == 0 and torch.isfinite(value)


def test_step_loss_gives_the_functional_gradient_and_owns_the_running_stats():
    """The pure step's loss (``Program.loss_with``) on a batch-norm model
    equals the gradient through ``functional_call`` on the same buffers,
    leaves the model's own parameters and the given buffers alone, and
    ``Program.updated_buffers`` gives the statistics an eager training-mode
    forward pass would."""
    from step import Program
    import hypergradients
    from optimisers import OPTIMISERS
    torch.manual_seed(0)
    model = models.build_model({"class": "MLP", "layer_sizes": [64, 8, 10], "batch_norm": True},
                               DIGITS).double()
    program = Program(model=model, loss_function=CROSS_ENTROPY, data=DIGITS,
                      optimiser=OPTIMISERS.get("SGD")(), method=hypergradients.NoHypergradient(),
                      outer=None, transforms={}, clipping={}, optimised=[],
                      network_weight_steps=1)
    own = [p.detach().clone() for p in model.parameters()]
    weights = tuple(p.detach() + 0.1 * torch.randn_like(p) for p in model.parameters())
    batch = (torch.randn(16, 1, 8, 8, dtype=torch.float64) + 3.0, torch.randint(0, 10, (16,)))
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    reference_buffers = {name: value.clone() for name, value in model.named_buffers()}
    leaves = tuple(w.clone().requires_grad_() for w in weights)
    expected = torch.autograd.grad(
        loss_fn(model, dict(zip(program.names, leaves)), reference_buffers, *batch, CROSS_ENTROPY),
        leaves)
    ours = grad(program.loss_with(buffers))(weights, batch)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(buffers[name], value) for name, value in model.named_buffers())
    updated = program.updated_buffers(weights, buffers, batch[0])
    for name, value in reference_buffers.items():  # the eager forward's statistics
        assert torch.equal(updated[name], value), name
    assert updated["layers.2.num_batches_tracked"].item() == 1
    assert buffers["layers.2.num_batches_tracked"].item() == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), own))


def test_program_calls_a_tied_model_with_the_given_weight_in_both_places():
    """The step spells out tied weights once (``step.tied_names``) and calls
    ``functional_call`` without its per-call tie look-up: the decoder must
    still use the weight given for the embedding, not the module's own."""
    from step import Program, tied_names
    import hypergradients
    from optimisers import OPTIMISERS
    torch.manual_seed(0)
    vocabulary = fake_data((5,), 30, task="language_model")
    model = models.build_model({"class": "LSTMLanguageModel", "embedding_size": 12,
                                "hidden_size": 12, "dropout": 0.0}, vocabulary).double()
    assert tied_names(model) == {"embedding.weight": ["decoder.weight"]}
    program = Program(model=model, loss_function=CROSS_ENTROPY, data=vocabulary,
                      optimiser=OPTIMISERS.get("SGD")(), method=hypergradients.NoHypergradient(),
                      outer=None, transforms={}, clipping={}, optimised=[],
                      network_weight_steps=1)
    weights = tuple(p.detach() + 0.5 * torch.randn_like(p) for p in model.parameters())
    tokens = torch.randint(0, 30, (3, 5))
    expected = functional_call(model, dict(zip(program.names, weights)), (tokens,))
    assert torch.equal(program.predict(weights, {}, tokens), expected)
    untied = functional_call(model, dict(zip(program.names, weights)), (tokens,), tie_weights=False)
    assert not torch.allclose(untied, expected)  # the tie matters for these weights


def folded_population_forward(layer, inputs, in_dims):
    """vmap over members' weights (and inputs, with ``in_dims[2] == 0``) of
    ``layer``'s forward and of the gradient of a loss of it, and the aten
    products that ran."""
    def forward(weight, bias, batch):
        return functional_call(layer, {"weight": weight, "bias": bias}, (batch,))

    def loss(weight, bias, batch):
        return forward(weight, bias, batch).tanh().sum()

    torch.manual_seed(0)
    weights, biases = torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    with torch.profiler.profile() as profile:
        outputs = torch.func.vmap(forward, in_dims=in_dims)(weights, biases, inputs)
        gradients = torch.func.vmap(grad(loss, argnums=(0, 1)), in_dims=in_dims)(weights, biases, inputs)
    ops = {event.key for event in profile.key_averages()}
    return weights, biases, outputs, gradients, ops


@pytest.mark.parametrize("shared_inputs", [True, False], ids=["shared-batch", "own-batches"])
def test_folded_linear_is_linear_and_one_matrix_product_for_a_shared_batch(shared_inputs):
    layer = models.fold_for_population(models.FoldedLinear(8, 5).double())
    torch.manual_seed(1)
    inputs = torch.randn(7, 8, dtype=torch.float64) if shared_inputs else torch.randn(4, 7, 8, dtype=torch.float64)
    weights, biases, outputs, gradients, ops = folded_population_forward(
        layer, inputs, (0, 0, None if shared_inputs else 0))
    member_inputs = [inputs] * 4 if shared_inputs else list(inputs)
    expected = torch.stack([torch.nn.functional.linear(x, w, b)
                            for x, w, b in zip(member_inputs, weights, biases)])
    torch.testing.assert_close(outputs, expected, rtol=1e-12, atol=1e-12)
    for member, (x, w, b) in enumerate(zip(member_inputs, weights, biases)):
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        torch.nn.functional.linear(x, w, b).tanh().sum().backward()
        torch.testing.assert_close(gradients[0][member], w.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gradients[1][member], b.grad, rtol=1e-12, atol=1e-12)
    if shared_inputs:  # the point of the fold: no product batched over members
        assert "aten::mm" in ops and "aten::bmm" not in ops, sorted(ops)
        _, _, _, _, unfolded_ops = folded_population_forward(models.FoldedLinear(8, 5).double(), inputs,
                                                             (0, 0, None))
        assert "aten::bmm" in unfolded_ops, sorted(unfolded_ops)  # the order a single run keeps


def test_only_a_population_folds_its_linear_layers():
    model = models.MLP(layer_sizes=[8, 50, 1])
    assert all(not layer.folded for layer in model.modules() if isinstance(layer, models.FoldedLinear))
    models.fold_for_population(model)
    assert [layer.folded for layer in model.modules() if isinstance(layer, models.FoldedLinear)] == [True, True]
