"""Offline image data for the commentary experiments.

Everything is built from scikit-learn's bundled 8x8 digits (no download), or
from MNIST where its torchvision files already sit under
``$HYPERGRAD_DATA/MNIST`` (``source: mnist``). A data file selects one with
``teaching: {data: {class: RotatedDigits, overlapping: false}}``.

The base images are split into train/validation/test groups *before* any
sample is generated, so no source digit appears in two splits. Construction
uses the data's own ``seed`` (not the run's), so all seeds of an experiment
see the same data.
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from errors import UserError
from registry import Registry

from commentaries.common import check_choice, check_int

DATASETS = Registry("teaching.data")


@dataclass
class TeachingData:
    """Tensors of the three splits plus what the plots need (e.g. angles)."""
    name: str
    spec: dict
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    extras: dict = field(default_factory=dict)

    @property
    def in_channels(self):
        return self.train_x.shape[1]

    @property
    def image_size(self):
        return self.train_x.shape[-1]

    def shape(self):
        """Keyword arguments every student constructor takes."""
        return {"in_channels": self.in_channels, "image_size": self.image_size,
                "num_outputs": self.num_classes}

    def to(self, device):
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_x", getattr(self, f"{split}_x").to(device))
            setattr(self, f"{split}_y", getattr(self, f"{split}_y").to(device))
        self.extras = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.extras.items()}
        return self


def build_data(spec, where="teaching.data"):
    """A :class:`TeachingData` from a ``{class: ..., options...}`` mapping."""
    if spec is None:
        raise UserError(f"{where}: missing; a data file sets e.g. "
                        f"'teaching: {{data: {{class: Digits}}}}' (valid: {', '.join(DATASETS.names())})")
    data = DATASETS.build(spec, where)
    data.spec = dict(spec)
    return data


# ----------------------------------------------------------------------------
# Base images


def _data_root(data_root):
    return data_root or os.environ.get("HYPERGRAD_DATA") or "data"


def base_images(source="digits", data_root=None):
    """``(images N×H×W in [0, 1], labels N)`` from the embedded digits or MNIST."""
    check_choice(source, "data.source", ("digits", "mnist"))
    if source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
        return images, torch.tensor(bunch.target, dtype=torch.long)
    import torchvision

    root = _data_root(data_root)
    try:
        mnist = torchvision.datasets.MNIST(root, train=True, download=False)
    except RuntimeError as error:
        raise UserError(f"teaching.data.source: mnist: no MNIST files under {root}/MNIST ({error}); "
                        f"use 'source: digits' or set HYPERGRAD_DATA") from error
    return mnist.data.float() / 255.0, mnist.targets.long()


def _split_indices(count, fractions, generator):
    """Disjoint index groups of the given fractions of a random permutation."""
    order = torch.randperm(count, generator=generator)
    sizes = [int(round(f * count)) for f in fractions[:-1]]
    sizes.append(count - sum(sizes))
    return torch.split(order, sizes)


def rotate(images, degrees):
    """Rotate N×C×H×W images by per-image angles (bilinear, zero padding)."""
    radians = degrees * math.pi / 180.0
    cos, sin = torch.cos(radians), torch.sin(radians)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], -1), torch.stack([sin, cos, zeros], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _resize(images, size):
    """N×H×W -> N×1×size×size."""
    images = images[:, None]
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1)


SPLITS = (0.5, 0.2, 0.3)


# ----------------------------------------------------------------------------
# Datasets


@DATASETS.register("Digits")
def digits(*, source="digits", image_size=8, validation_size=300, test_size=400, seed=0, data_root=None,
           max_examples=0):
    """The 10-class digits themselves (augmentation experiments): fixed
    validation and test sizes, the rest for training (the same split options
    as ``configs/digits_teaching.yaml`` uses for GTN and AuxiLearn)."""
    check_int(image_size, "data.image_size", 4, 64)
    check_int(max_examples, "data.max_examples", 0)
    images, labels = base_images(source, data_root)
    generator = torch.Generator().manual_seed(check_int(seed, "data.seed"))
    if max_examples:
        keep = torch.randperm(len(images), generator=generator)[:max_examples]
        images, labels = images[keep], labels[keep]
    check_int(validation_size, "data.validation_size", 1)
    check_int(test_size, "data.test_size", 1)
    if validation_size + test_size >= len(images):
        raise UserError(f"teaching.data: validation_size + test_size must leave training data "
                        f"(there are {len(images)} images)")
    images = _resize(images, image_size)
    order = torch.randperm(len(images), generator=generator)
    val, test = order[:validation_size], order[validation_size:validation_size + test_size]
    train = order[validation_size + test_size:]
    return TeachingData("Digits", {}, images[train], labels[train], images[val], labels[val],
                        images[test], labels[test], num_classes=10)


ROTATIONS = {False: ((15.0, 45.0), (-45.0, -15.0)), True: ((-5.0, 30.0), (-30.0, 5.0))}


@DATASETS.register("RotatedDigits")
def rotated_digits(*, overlapping=False, digit=1, source="digits", image_size=16, train_size=512,
                   validation_size=256, test_size=512, seed=0, data_root=None):
    """Images of one digit rotated by a class-dependent angle: class 0 is turned
    anticlockwise by U[15°, 45°], class 1 clockwise by U[-45°, -15°]; with
    ``overlapping: true`` the ranges are U[-5°, 30°] and U[-30°, 5°], so
    near-upright examples are ambiguous. ``extras['*_angle']`` hold the angles."""
    if not isinstance(overlapping, bool):
        raise UserError(f"teaching.data.overlapping: must be true or false, got {overlapping!r}")
    check_int(digit, "data.digit", 0, 9)
    check_int(image_size, "data.image_size", 8, 64)
    sizes = [check_int(train_size, "data.train_size", 1), check_int(validation_size, "data.validation_size", 1),
             check_int(test_size, "data.test_size", 1)]
    images, labels = base_images(source, data_root)
    images = _resize(images[labels == digit], image_size)
    generator = torch.Generator().manual_seed(check_int(seed, "data.seed"))
    groups = _split_indices(len(images), SPLITS, generator)
    ranges = torch.tensor(ROTATIONS[overlapping])
    splits, extras = [], {}
    for name, group, size in zip(("train", "val", "test"), groups, sizes):
        label = torch.randint(0, 2, (size,), generator=generator)
        low, high = ranges[label, 0], ranges[label, 1]
        angle = low + (high - low) * torch.rand(size, generator=generator)
        base = group[torch.randint(0, len(group), (size,), generator=generator)]
        splits += [rotate(images[base], angle), label]
        extras[f"{name}_angle"] = angle
    return TeachingData("RotatedDigits" + ("Overlapping" if overlapping else ""), {}, *splits,
                        num_classes=2, extras=extras)


@DATASETS.register("ColouredDigits")
def coloured_digits(*, source="digits", train_size=2048, validation_size=512, test_size=1024, seed=0,
                    data_root=None):
    """Two digits in two distinct random quadrants of a 2×2 grid, one red and one
    blue; the label is the red digit. ``extras['*_red_quadrant']`` (0..3,
    row-major) says where the answer is, for the mask plots."""
    sizes = [check_int(train_size, "data.train_size", 1), check_int(validation_size, "data.validation_size", 1),
             check_int(test_size, "data.test_size", 1)]
    images, labels = base_images(source, data_root)
    generator = torch.Generator().manual_seed(check_int(seed, "data.seed"))
    groups = _split_indices(len(images), SPLITS, generator)
    side = images.shape[-1]
    splits, extras = [], {}
    for name, group, size in zip(("train", "val", "test"), groups, sizes):
        red = group[torch.randint(0, len(group), (size,), generator=generator)]
        blue = group[torch.randint(0, len(group), (size,), generator=generator)]
        quadrants = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(size)])
        canvas = torch.zeros(size, 3, 2 * side, 2 * side)
        for channel, source_index, quadrant in ((0, red, quadrants[:, 0]), (2, blue, quadrants[:, 1])):
            for q in range(4):
                rows = (quadrant == q).nonzero().flatten()
                r, c = divmod(q, 2)
                canvas[rows, channel, r * side:(r + 1) * side, c * side:(c + 1) * side] = images[source_index[rows]]
        splits += [canvas, labels[red]]
        extras[f"{name}_red_quadrant"] = quadrants[:, 0]
    return TeachingData("ColouredDigits", {}, *splits, num_classes=10, extras=extras)
