"""TensorBoard logging without per-step host synchronisation.

Values are handed over as device tensors and buffered; :meth:`Tracker.flush`
moves them all to the host in one transfer (one sync per log interval rather
than one per value) and writes them with ``SummaryWriter``.
"""
import math

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


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
        """Write everything buffered; returns the newest value of each tag."""
        if self._scalars:
            tensors = [torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu()
                       if not torch.is_tensor(v) else v.reshape(()).to(torch.float64)
                       for _, v, _ in self._scalars]
            values = torch.stack([t.to(tensors[0].device) for t in tensors]).cpu().tolist()
            for (tag, _, step), value in zip(self._scalars, values):
                self.writer.add_scalar(tag, value, step)
                self.latest[tag] = value
        for tag, values, step in self._histograms:
            self.writer.add_histogram(tag, values.float().cpu(), step)
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
