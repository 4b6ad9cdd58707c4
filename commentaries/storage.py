"""Learned teachers as files: one format for every teaching method.

A teacher file holds the teacher's tensors (a teacher network's weights, an
augmentation grid, a GTN generator and its inputs, an auxiliary network) and
plain metadata: the registered ``method`` that learned it (which also knows
how to teach a fresh student with it), the dataset, how it was learned, the
teacher's constructor options and the teaching config. Files are written
atomically and read back with ``torch.load(weights_only=True)``, which
restores tensors bit for bit and never unpickles arbitrary objects.

This module knows no method: ``TrainWithCommentary`` looks the method up in
the registry by the name stored in the file.
"""
import io
import os
import warnings
from pathlib import Path

import torch

from errors import UserError
from train import atomic_write

FORMAT = "hypergrad-teacher"
VERSION = 2
FILE_NAME = "teacher.pt"


def plain(value):
    """Metadata restricted to what ``weights_only`` loading accepts."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_teacher(path, *, method, tensors, dataset=None, learned_by=None, config=None, teacher=None):
    """Write a teacher file atomically and return its path.

    ``method``: the registered teaching method that can use it again;
    ``tensors``: name -> tensor; ``dataset``: the data spec it was learned on;
    ``learned_by``: e.g. ``{'algorithm': 'unrolled (Algorithm 1)', 'seed': 0}``;
    ``teacher``: the teacher network's constructor options, if any.
    """
    payload = {
        "format": FORMAT, "version": VERSION, "method": str(method),
        "dataset": plain(dataset), "learned_by": plain(learned_by or {}), "config": plain(config or {}),
        "teacher": plain(teacher or {}),
        "tensors": {name: tensor.detach().cpu().clone() for name, tensor in tensors.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: temporary.write_bytes(buffer.getvalue()))
    return path


def load_teacher(path, where="teaching.commentary", method=None):
    """Read a teacher file back; a one-line :class:`UserError` if it is not one
    (or not one learned by ``method``, when given)."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"{where}: must be a path to a teacher file, got {path!r}")
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file, reported as one line
        raise UserError(f"{where}: {path} is not a readable teacher file ({type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{where}: {path} is not a {FORMAT} file")
    if payload.get("version") != VERSION or not isinstance(payload.get("tensors"), dict) \
            or not all(torch.is_tensor(t) for t in payload["tensors"].values()):
        raise UserError(f"{where}: {path}: unsupported version {payload.get('version')!r} or malformed tensors")
    if method is not None and payload.get("method") != method:
        raise UserError(f"{where}: {path} holds a {payload.get('method')} teacher, not {method}")
    return payload
