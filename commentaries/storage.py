"""Learned commentaries as files: save once, reuse to teach new students.

One ``.pt`` file holds the commentary's tensors (a teacher network's weights
or an augmentation grid) and the metadata needed to use it again: the dataset
it was learned on, its kind, how it was learned (algorithm, steps, seed) and
the teaching config. Files are written atomically and read back with
``torch.load(weights_only=True)``, which restores tensors bit for bit and never
unpickles arbitrary objects.

A config reuses one to train a fresh student, of another architecture too::

    teaching:
      class: TrainWithCommentary
      commentary: runs/.../commentary.pt
      student: {class: MLP, hidden: [128]}
"""
import copy
import io
import os
import warnings

import torch

from errors import UserError

from commentaries import TEACHERS
from commentaries.common import atomic_write_bytes, check_choice, check_float, check_int, evaluation_generator
from commentaries.data import build_data

FORMAT = "hypergrad-commentary"
VERSION = 1
KINDS = ("example_weighting", "augmentation", "attention")


def _plain(value):
    """Metadata restricted to what ``weights_only`` loading accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_commentary(path, *, kind, tensors, dataset, learned_by, config, teacher=None):
    """Write a commentary file atomically and return its path.

    ``tensors``: name -> tensor (teacher ``state_dict`` or ``{'grid': φ}``);
    ``dataset``: the data spec it was learned on; ``learned_by``: e.g.
    ``{'algorithm': 'unrolled (Algorithm 1)', 'inner_steps': 20, 'seed': 0}``;
    ``teacher``: the teacher network's constructor options, if any.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown commentary kind {kind!r}")
    payload = {
        "format": FORMAT, "version": VERSION, "kind": kind,
        "dataset": _plain(dataset), "learned_by": _plain(learned_by), "config": _plain(config),
        "teacher": _plain(teacher),
        "tensors": {name: tensor.detach().cpu().clone() for name, tensor in tensors.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_commentary(path, where="teaching.commentary"):
    """Read a commentary file back; a :class:`UserError` if it is not one."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"{where}: must be a path to a commentary file, got {path!r}")
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file, reported as one line
        raise UserError(f"{where}: {path} is not a readable commentary file ({type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{where}: {path} is not a {FORMAT} file")
    if payload.get("version") != VERSION or payload.get("kind") not in KINDS:
        raise UserError(f"{where}: {path}: unsupported version {payload.get('version')!r} "
                        f"or kind {payload.get('kind')!r}")
    return payload


def _kind_module(kind):
    from commentaries import attention, augmentation, example_weighting

    return {"example_weighting": example_weighting, "augmentation": augmentation,
            "attention": attention}[kind]


@TEACHERS.register("TrainWithCommentary")
def train_with_commentary(*, context, commentary, student=None, data=None, steps=300, lr=0.001,
                          batch_size=64, optimiser="Adam", log_interval=25):
    """Train a fresh student (any registered architecture) with a saved,
    frozen commentary and report its learning curve and final metrics.

    ``data`` defaults to the dataset the commentary was learned on; a data
    file may set it, but it must name the same dataset class.
    """
    payload = load_commentary(commentary)
    learned_on = payload["dataset"]
    if data is None:
        data = copy.deepcopy(learned_on)
    elif data.get("class") != learned_on.get("class"):
        raise UserError(f"teaching.data: the commentary in {commentary} was learned on "
                        f"{learned_on.get('class')}, not {data.get('class')}")
    options = {
        "steps": check_int(steps, "steps", 1), "lr": check_float(lr, "lr", 0.0, strict_minimum=True),
        "batch_size": check_int(batch_size, "batch_size", 1),
        "optimiser": check_choice(optimiser, "optimiser", ("Adam", "SGD")),
        "log_interval": check_int(log_interval, "log_interval", 1),
    }
    dataset = build_data(data).to(context.device)
    generator = evaluation_generator(context.seed)
    module = _kind_module(payload["kind"])
    metrics = module.train_student_with_commentary(payload, dataset, student, options, context, generator)
    return {"status": "finished", "dataset": dataset.name, "final": metrics,
            "objective": metrics["Loss/Validation"],
            "commentary": {"path": str(commentary), "kind": payload["kind"],
                           "learned_by": payload["learned_by"]}}
