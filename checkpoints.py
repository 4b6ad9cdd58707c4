"""Checkpoint files that are checked when read and never run code.

A checkpoint is one file, written atomically, holding a small wrapper::

    {"format": "hypergrad-checkpoint", "version": 1, "sha256": <hex>, "payload": <uint8 tensor>}

where ``payload`` is the ``torch.save`` bytes of the state. Both layers are
read with ``torch.load(weights_only=True)``, which unpickles only tensors,
containers, numbers and strings: a hostile pickle handed over as a checkpoint
is refused and runs nothing. The checksum catches a file corrupted on disk; the
saved configuration catches a checkpoint of another run (another model size,
``network_weight_steps`` or ``optimised_hyperparameters``), which would
otherwise be continued silently under a ``config.yaml`` that says otherwise.
"""
import hashlib
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from errors import UserError

FORMAT = "hypergrad-checkpoint"
VERSION = 1
# What must be the same for a checkpoint to continue this run.
IDENTITY_KEYS = ("model", "loss", "dataset", "network_weight_steps", "optimised_hyperparameters",
                 "high_dimensional_hyperparameters", "transformed_hyperparameters", "hypergradient",
                 "batch_size", "dtype", "validation_proportion", "fold_validation_into_training")


def encode(state):
    """The bytes of a checkpoint file holding ``state``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapper = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    return buffer.getvalue()


def write(path, state):
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(encode(state))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read(path, label, map_location=None):
    """The state saved in ``path``; a one-line :class:`UserError` (starting
    with ``label``) for a missing, foreign, hostile or corrupted file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{label}: is a directory, not a saved state")
    if not path.is_file():
        raise UserError(f"{label}: saved state not found")
    wrapper = _load(path, label)
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        raise UserError(f"{label}: not a hypergrad checkpoint (no {FORMAT} header)")
    if wrapper.get("version") != VERSION:
        raise UserError(f"{label}: checkpoint version {wrapper.get('version')!r}, expected {VERSION}")
    payload = wrapper.get("payload")
    if not torch.is_tensor(payload) or payload.dtype != torch.uint8:
        raise UserError(f"{label}: malformed checkpoint payload")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != wrapper.get("sha256"):
        raise UserError(f"{label}: checksum mismatch: the checkpoint is corrupted")
    state = _load(io.BytesIO(data), label, map_location)
    if not isinstance(state, dict):
        raise UserError(f"{label}: malformed checkpoint payload")
    return state


def _load(source, label, map_location=None):
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.simplefilter("ignore")
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UserError(f"{label}: refused by torch.load(weights_only=True): not plain tensors "
                            f"and containers (a damaged file, or a pickle that could run code)") from None
        raise UserError(f"{label}: not a readable checkpoint (not a torch file)") from None
    except (RuntimeError, EOFError, ValueError, TypeError, KeyError, OSError, AttributeError,
            zipfile.BadZipFile, UnicodeDecodeError, IndexError, OverflowError, MemoryError) as error:
        raise UserError(f"{label}: not a readable checkpoint (truncated or corrupted: "
                        f"{type(error).__name__})") from None


def check_matches(state, cfg, label):
    """Refuse a checkpoint whose run differs from this configuration."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{label}: checkpoint without a configuration")
    for key in IDENTITY_KEYS:
        if saved.get(key) != cfg.get(key):
            raise UserError(f"{label}: a checkpoint of another configuration: {key} is "
                            f"{saved.get(key)!r} there, {cfg.get(key)!r} here ({cfg.origin(key)}); "
                            f"use another run directory or remove the checkpoint")


def remove_stale_temporaries(directory):
    """Delete ``.<name>.<pid>.tmp`` files left by a write that was killed (the
    caller holds the directory's lock, so no live writer owns them)."""
    for path in Path(directory).glob(".*.tmp"):
        try:
            path.unlink()
        except OSError:
            pass
