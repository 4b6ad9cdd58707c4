"""TensorBoard logging without per-step host synchronisation.

Values are handed over as device tensors and buffered; :meth:`Tracker.flush`
moves them all to the host in one transfer (one sync per log interval rather
than one per value) and writes them with ``SummaryWriter``.
"""
import math

import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


def host_values(values):
    """Python floats for a list of numbers and one-element tensors, with one
    stack and one host transfer per dtype and device (not one per value)."""
    result = [None if torch.is_tensor(value) else float(value) for value in values]
    groups = {}
    for index, value in enumerate(values):
        if torch.is_tensor(value):
            groups.setdefault((value.dtype, value.device), []).append(index)
    for indices in groups.values():
        stacked = torch.stack([values[i].reshape(()) for i in indices])
        for index, value in zip(indices, stacked.to(torch.float64).cpu().tolist()):
            result[index] = value
    return result


class Tracker:
    def __init__(self, run_dir, purge_step=None):
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)
        self._scalars = []      # (tag, tensor or float, step)
        self._histograms = []   # (tag, tensor, step)
        self.latest = {}

    def scalar(self, tag, value, step):
        self._scalars.append((tag, value.detach() if torch.is_tensor(value) else value, step))

    def histogram(self, tag, values, step):
        self._histograms.append((tag, values.detach(), step))

    def flush(self):
        """Write everything buffered; returns the newest value of each tag.

        One TensorBoard event per step holds all of that step's scalars (a
        multi-value ``Summary``, which TensorBoard's readers split by tag):
        about 7x cheaper per value than ``add_scalar``'s event per value."""
        if self._scalars:
            values = host_values([value for _, value, _ in self._scalars])
            by_step = {}
            for (tag, _, step), value in zip(self._scalars, values):
                by_step.setdefault(step, []).append(Summary.Value(tag=tag, simple_value=value))
                self.latest[tag] = value
            file_writer = self.writer._get_file_writer()
            for step, entries in by_step.items():
                file_writer.add_summary(Summary(value=entries), step)
        for tag, values, step in self._histograms:
            values = values.float().cpu()
            finite = values[torch.isfinite(values)]
            if finite.numel():  # TensorBoard refuses a histogram of a diverged run's inf/NaN
                self.writer.add_histogram(tag, finite, step)
        self._scalars, self._histograms = [], []
        self.writer.flush()
        return dict(self.latest)

    def hparams(self, hyperparameters, metric_tags):
        """Register the run in TensorBoard's HParams view (metrics are the
        scalar tags written during training)."""
        clean = {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
                 for key, value in hyperparameters.items()}
        experiment, start, end = hparams(clean, {tag: math.nan for tag in metric_tags})
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    def close(self):
        self.flush()
        self.writer.close()
