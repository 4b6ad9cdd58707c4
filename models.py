"""Models and losses a config can name.

Every model must run under ``torch.func.functional_call`` and support double
backward (Hessian-vector products for implicit hypergradients), so: no
in-place operations on parameters, no ``inplace=True`` activations, and
BatchNorm statistics only in buffers. Shapes the data determines (input
features, channels, classes, vocabulary) are injected by :func:`build_model`
when the constructor takes them and the config did not set them::

    model: {class: MLP, layer_sizes: [8, 50, 1], activation_function: ReLU}
    loss: {class: MSELoss}
"""
import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F

from registry import Registry

MODELS = Registry("model")
LOSSES = Registry("loss")
ACTIVATIONS = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid, "GELU": nn.GELU, "ELU": nn.ELU}


def activation(name):
    """A fresh, not-in-place activation module for the configured name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation_function {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def build_model(spec, data, where="model"):
    """The model named by ``spec['class']`` with data-derived arguments
    (``input_shape``, ``output_size``, ``in_channels``, ``num_classes``,
    ``vocab_size``) filled in where the constructor takes them and the config
    left them out."""
    derived = {
        "input_shape": tuple(data.input_shape),
        "output_size": int(data.output_size),
        "in_channels": int(data.input_shape[0]) if len(data.input_shape) == 3 else None,
        "num_classes": int(data.output_size),
        "vocab_size": int(data.output_size),
    }
    if not isinstance(spec, dict) or "class" not in spec:
        return MODELS.build(spec, where)  # reports the malformed spec
    accepted = inspect.signature(MODELS.get(spec["class"], f"{where}.class")).parameters
    injected = {key: value for key, value in derived.items()
                if key in accepted and key not in spec and value is not None}
    return MODELS.build(spec, where, **injected)


def build_loss(spec, where="loss"):
    """The loss named by ``spec['class']``: ``loss(outputs, targets)`` -> mean scalar."""
    return LOSSES.build(spec, where)


# ---------------------------------------------------------------- BatchNorm

class TransformSafeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose running statistics update in place only where that is
    allowed: in eager mode, or in a single ``torch.func`` transform that
    receives the buffers as inputs. Inside nested transforms (Hessian-vector
    products) the buffers are captured from an outer level and cannot be
    mutated; there the layer normalises with batch statistics and leaves the
    running statistics alone, which is also the right semantics, since a
    hypergradient computation is not a training step."""

    def forward(self, inputs):
        if not (self.training and self.track_running_stats):
            return super().forward(inputs)
        try:
            return super().forward(inputs)
        except RuntimeError as error:
            if "captured Tensor" not in str(error):
                raise
            return F.batch_norm(inputs, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BatchNorm1d(TransformSafeBatchNorm, nn.BatchNorm1d):
    """:class:`nn.BatchNorm1d` that is safe under nested torch.func transforms."""


class BatchNorm2d(TransformSafeBatchNorm, nn.BatchNorm2d):
    """:class:`nn.BatchNorm2d` that is safe under nested torch.func transforms."""


# ---------------------------------------------------------------------- MLP

class FoldedLinear(nn.Linear):
    """:class:`nn.Linear` that a population switches to computing
    ``inputs @ weight.T`` as ``(weight @ inputs.mT).mT``: the same product, to
    rounding (:func:`fold_for_population`).

    Why: a population's members share one batch (UCI energy's full batch, every
    evaluation) while each has its own weights. Under ``vmap`` the usual order,
    shared 2-D inputs times batched weights, expands the inputs into a batched
    product of N small ones; the folded order, batched 3-D weights times a shared
    2-D factor, is one that ``matmul`` turns into a single ``(N*out) x in @ in x
    batch`` matrix product, and its weight gradient likewise. The compiled step
    of 64 UCI-energy members is 15-20% faster (bench/RESULTS.md). A single run
    keeps ``F.linear``, which is faster unbatched (one ``addmm``)."""

    folded = False

    def forward(self, inputs):
        if not self.folded or inputs.dim() < 2:
            return F.linear(inputs, self.weight, self.bias)
        outputs = torch.matmul(self.weight, inputs.mT).mT
        return outputs if self.bias is None else outputs + self.bias


def fold_for_population(model):
    """Switch ``model``'s :class:`FoldedLinear` layers to the folded order (for a
    population's vectorised step; a single run never calls this)."""
    for module in model.modules():
        if isinstance(module, FoldedLinear):
            module.folded = True
    return model


@MODELS.register("MLP", aliases=["MultiLayerPerceptron"])
class MLP(nn.Module):
    """Fully connected network on flattened inputs; one activation throughout,
    none after the last layer. ``layer_sizes`` gives every width;
    ``hidden`` only the hidden ones (the data sets the others). With ``batch_norm`` each hidden layer is
    Linear (no bias, as BatchNorm's shift replaces it) -> BatchNorm -> activation,
    as in the paper's Fashion-MNIST BatchNorm experiment."""

    def __init__(self, layer_sizes=None, activation_function="ReLU", batch_norm=False,
                 input_shape=None, output_size=None, hidden=None):
        super().__init__()
        if (layer_sizes is None) == (hidden is None):
            raise ValueError("give either layer_sizes or hidden (the hidden sizes; input and output "
                             "sizes then come from the data)")
        if hidden is not None:  # the teaching configs' form: {class: MLP, hidden: [64]}
            layer_sizes = [math.prod(input_shape), *hidden, output_size]
        layer_sizes = [int(size) for size in layer_sizes]
        activation(activation_function)  # reject a bad name even without hidden layers
        if len(layer_sizes) < 2:
            raise ValueError(f"layer_sizes needs at least input and output sizes, got {layer_sizes}")
        if input_shape is not None and layer_sizes[0] != math.prod(input_shape):
            raise ValueError(f"layer_sizes[0] is {layer_sizes[0]} but the dataset's inputs have "
                             f"{math.prod(input_shape)} features (input shape {tuple(input_shape)})")
        if output_size is not None and layer_sizes[-1] != output_size:
            raise ValueError(f"layer_sizes[-1] is {layer_sizes[-1]} but the dataset needs "
                             f"{output_size} outputs")
        layers = [nn.Flatten()]
        for index, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
            last = index == len(layer_sizes) - 2
            layers.append(FoldedLinear(fan_in, fan_out, bias=last or not batch_norm))
            if not last:
                if batch_norm:
                    layers.append(BatchNorm1d(fan_out))
                layers.append(activation(activation_function))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs):
        return self.layers(inputs)


@MODELS.register("Linear")
def linear(input_shape, output_size):
    """Multinomial logistic regression on flattened inputs (an MLP without
    hidden layers): the convex student of the exact teaching tests."""
    return MLP(hidden=[], input_shape=input_shape, output_size=output_size)


# ---------------------------------------------------------------------- CNNs

@MODELS.register("CNN")
def cnn(in_channels, num_classes, input_shape, width=16, activation_function="ReLU"):
    """Two blocks of (3x3 conv, activation, 2x2 max-pool) and a linear head, no
    BatchNorm: the small students and teachers of learning to teach, whose
    weights are all parameters (``functional_call`` with no buffers)."""
    spatial = input_shape[-1] // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), activation(activation_function), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), activation(activation_function), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(width * spatial * spatial, num_classes))


class BlockCNN(nn.Module):
    """Conv(3x3) -> BatchNorm -> ReLU -> MaxPool(2) blocks, global average
    pooling, then a linear classifier. Pooling uses ``ceil_mode`` so small
    images (8x8 digits) survive four blocks."""

    def __init__(self, channels, in_channels, num_classes, activation_function="ReLU"):
        super().__init__()
        blocks = []
        for fan_in, fan_out in zip([in_channels, *channels[:-1]], channels):
            blocks += [nn.Conv2d(fan_in, fan_out, kernel_size=3, padding=1, bias=False),
                       BatchNorm2d(fan_out), activation(activation_function),
                       nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels[-1], num_classes)

    def forward(self, inputs):
        return self.classifier(self.features(inputs).mean(dim=(2, 3)))


def check_channels(channels, blocks):
    channels = [int(width) for width in channels]
    if len(channels) != blocks:
        raise ValueError(f"channels needs {blocks} widths (one per block), got {channels}")
    return channels


@MODELS.register("TwoBlockCNN")
def two_block_cnn(in_channels, num_classes, channels=(32, 64), activation_function="ReLU"):
    """Small CNN: two conv-bn-relu-pool blocks."""
    return BlockCNN(check_channels(channels, 2), in_channels, num_classes, activation_function)


@MODELS.register("FourBlockCNN")
def four_block_cnn(in_channels, num_classes, channels=(32, 64, 128, 256), activation_function="ReLU"):
    """Medium CNN: four conv-bn-relu-pool blocks."""
    return BlockCNN(check_channels(channels, 4), in_channels, num_classes, activation_function)


# -------------------------------------------------------------------- ResNets

def resnet(constructor, in_channels, num_classes, cifar_stem):
    """A torchvision ResNet without pretrained weights, its ReLUs made
    out-of-place (double backward under functional_call), and optionally the
    CIFAR stem (3x3 stride-1 conv, no max-pool) for 32x32 images."""
    model = constructor(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if type(module) is nn.BatchNorm2d:
            module.__class__ = BatchNorm2d
    return model


@MODELS.register("ResNet18", aliases=["resnet18"])
def resnet18(num_classes, in_channels=3, cifar_stem=False):
    """torchvision ResNet-18 (the paper's CIFAR-10 model uses the ImageNet stem)."""
    import torchvision.models
    return resnet(torchvision.models.resnet18, in_channels, num_classes, cifar_stem)


@MODELS.register("ResNet34", aliases=["resnet34"])
def resnet34(num_classes, in_channels=3, cifar_stem=False):
    """torchvision ResNet-34."""
    import torchvision.models
    return resnet(torchvision.models.resnet34, in_channels, num_classes, cifar_stem)


# ----------------------------------------------------------------------- LSTM

class LSTMLayer(nn.Module):
    """One LSTM layer written out in tensor ops (same equations and
    initialisation as :class:`nn.LSTM`). The fused CPU/cuDNN kernels lack
    forward-mode AD and (cuDNN) double backward; this works under every
    ``torch.func`` transform. Input projections for all time steps are one
    matmul; only the recurrence loops over time."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_weights = nn.Linear(input_size, 4 * hidden_size)
        self.hidden_weights = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        bound = 1.0 / math.sqrt(hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, inputs):
        projected = self.input_weights(inputs)
        hidden = inputs.new_zeros(inputs.shape[0], self.hidden_size)
        cell = hidden
        outputs = []
        for step in range(inputs.shape[1]):
            gates = projected[:, step] + self.hidden_weights(hidden)
            input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)
            cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
            hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
            outputs.append(hidden)
        return torch.stack(outputs, dim=1)


@MODELS.register("LSTMLanguageModel", aliases=["LSTMwithEmbedding"])
class LSTMLanguageModel(nn.Module):
    """Embedding -> stacked LSTM layers -> linear decoder to vocabulary logits
    (N, L, V), with dropout between layers and optionally tied
    embedding/decoder weights (Zaremba et al.'s medium PTB model: 2 x 650).
    Each window starts from a zero state, so batches are independent and can
    be sampled by index.

    ``fused: true`` swaps the hand-written layers for :class:`nn.LSTM`
    (cuDNN: ~5x faster first-order training on an H100) for methods that
    never differentiate twice (the Random baselines); cuDNN has no double
    backward, so hypergradient methods need the default."""

    def __init__(self, vocab_size, embedding_size=650, hidden_size=650, num_layers=2, dropout=0.5,
                 tie_weights=True, fused=False):
        super().__init__()
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(f"tie_weights needs embedding_size == hidden_size, got "
                             f"{embedding_size} and {hidden_size}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.dropout = nn.Dropout(dropout)
        if fused:
            self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers=int(num_layers), batch_first=True,
                                dropout=dropout if int(num_layers) > 1 else 0.0)
        else:
            sizes = [embedding_size] + [hidden_size] * int(num_layers)
            self.layers = nn.ModuleList(LSTMLayer(fan_in, fan_out)
                                        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        hidden = self.dropout(self.embedding(tokens))
        if hasattr(self, "lstm"):
            hidden, _ = self.lstm(hidden)
        else:
            for index, layer in enumerate(self.layers):
                hidden = layer(self.dropout(hidden) if index else hidden)
        return self.decoder(self.dropout(hidden))


# --------------------------------------------------------------------- losses

@LOSSES.register("MSELoss")
class MSELoss(nn.Module):
    """Mean squared error over all elements."""

    def forward(self, outputs, targets):
        return F.mse_loss(outputs, targets)


@LOSSES.register("CrossEntropyLoss")
class CrossEntropyLoss(nn.Module):
    """Mean cross-entropy; sequence logits (N, L, V) and targets (N, L) are
    flattened so language models average over every predicted token."""

    def __init__(self, label_smoothing=0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, outputs, targets):
        if outputs.ndim == 3:  # sequences: flattened; vocabularies are long, the usual order is fast
            outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
        elif outputs.shape[-1] < 16 and outputs.numel() >= 1024:
            # Few classes, many rows (evaluations; a population's at every log interval):
            # the same loss with the classes second, as (1, classes, rows). PyTorch's CPU
            # log-softmax over a last dimension shorter than a vector register takes a
            # scalar path, ~13 ns per element: 10 classes x 4,096 rows, 541 us against 50.
            # A minibatch (50 x 10) keeps the usual order: there it is no slower, and the
            # extra kernel calls would cost its backward pass ~14 us a step.
            return F.cross_entropy(outputs.mT.unsqueeze(0), targets.unsqueeze(0),
                                   label_smoothing=self.label_smoothing)
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)
