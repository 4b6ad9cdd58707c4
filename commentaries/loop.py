"""One loop for every teaching method.

A method is a :class:`TeachingMethod`: it validates its options and loads its
data when built, builds its networks in :meth:`~TeachingMethod.setup`, takes
one outer step at a time, evaluates at log intervals, finishes (final
metrics, plots, evaluation students) and exports its teacher. :func:`run`
gives every method the same machinery as a hyperparameter run:

* logging through :class:`tracking.Tracker`: step metrics are summed on the
  device and written as interval means every ``log_interval`` steps, one host
  sync per interval;
* divergence: a non-finite interval mean stops the run, recorded
  ``diverged`` with the config's ``divergence_penalty`` as objective;
* ``checkpoint_every: N`` writes the method's state, the step, the wall time
  and the random states every N outer steps (atomically, with ``train.py``'s
  helpers); the same command with ``--run-dir`` resumes bit for bit (CPU);
* one results schema, one progress bar, one teacher file format
  (:mod:`commentaries.storage`);
* ``compile: true`` (pure methods only): the pure outer step under the
  same ``torch.compile`` as a hyperparameter run's step
  (:func:`engine.compiler`), compiled before the timed loop.
"""
import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import config
from engine import compiler, compiler_failures
from errors import UserError
from tracking import Tracker
from train import (CHECKPOINT, compile_announced, random_states, restore_random_states,
                   stop_if_preempted)

from commentaries import storage
from commentaries.common import load_data

CHECKPOINT_FORMAT = "hypergrad-teaching-checkpoint"


@dataclasses.dataclass
class Context:
    """What a teaching run gets from ``train.py`` (the run's settings, not the method's)."""
    run_dir: Path
    device: torch.device = torch.device("cpu")
    seed: int = 0
    progress: bool = False
    description: str = "teaching"
    checkpoint_every: int = 0
    divergence_penalty: float = config.SCHEMA["divergence_penalty"][2]
    validation_proportion: float = config.SCHEMA["validation_proportion"][2]
    data_root: str | None = None
    dtype: torch.dtype = torch.float32  # of the data and of every network and teacher tensor
    compile: bool = False  # torch.compile the pure outer step (PureTeachingMethod only)
    tracker: Tracker | None = None  # set by :func:`run`

    @property
    def writer(self):
        return None if self.tracker is None else self.tracker.writer

    @classmethod
    def from_config(cls, cfg, run_dir, device, progress):
        """The context of a ``teaching`` config's run (``train.py``, a population member)."""
        return cls(run_dir=run_dir, device=device, seed=cfg["seed"], progress=progress,
                   description=cfg["algorithm"], checkpoint_every=cfg["checkpoint_every"],
                   divergence_penalty=cfg["divergence_penalty"],
                   validation_proportion=cfg["validation_proportion"], data_root=cfg["data_root"],
                   compile=cfg["compile"], dtype={"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]])


class TeachingMethod:
    """The protocol every registered teaching method follows.

    Register a subclass with ``@TEACHERS.register("Name")``; its ``__init__``
    takes the method's options (the ``teaching`` section without ``class``)
    plus ``context``, validates them and loads the data (so a bad value is a
    one-line error before anything runs). Then :func:`run` calls
    :meth:`setup`, :meth:`begin` (fresh runs only) or :meth:`load_state_dict`
    (resumed ones), :meth:`outer_step` ``steps`` times with :meth:`evaluate`
    every ``log_interval`` steps, :meth:`finish` and :meth:`export`.
    """
    name = None        # the registered name (set when built), stored in teacher files
    steps = 0          # outer steps
    log_interval = 1   # outer steps between logs (and divergence checks)
    dataset_name = None

    def use_data(self, spec, context):
        """Load ``teaching.data`` (a :class:`datasets.Data` on the run's device)
        and remember its spec (teacher files record it)."""
        self.context, self.data_spec = context, spec
        self.data = load_data(spec, context)
        self.dataset_name = self.data.name

    def setup(self):
        """Build networks and optimisers (in a fixed order: a resumed run rebuilds them the same way)."""

    def begin(self):
        """Once, at a fresh start: e.g. the objective before learning."""

    def outer_step(self, step):
        """One outer step; returns ``{tag: device tensor}`` (averaged over the log interval)."""
        raise NotImplementedError

    def evaluate(self, step):
        """Extra ``{tag: value}`` at a log step (e.g. validation metrics)."""
        return {}

    def checkpointed(self):
        """``{name: object}`` whose state makes up a checkpoint: modules,
        optimisers, ``torch.Generator`` s, tensors, dicts of tensors or plain values."""
        return {}

    def state_dict(self):
        return {name: _state_of(value) for name, value in self.checkpointed().items()}

    def load_state_dict(self, state):
        for name, value in self.checkpointed().items():
            _load_state(value, state[name])

    def finish(self, steps_done):
        """``{"final": {tag: float}, "teaching": {...}, "hyperparameters": {...}}``; must
        include ``final['Loss/Validation']``, the run's objective."""
        raise NotImplementedError

    def export(self):
        """The teacher file's contents (:func:`storage.save_teacher` keywords
        except ``method``), or ``None`` when there is no teacher to save."""
        return None

    @classmethod
    def frozen_teaching(cls, payload, data, device):
        """A :class:`common.FrozenTeaching` from a saved teacher file, for
        ``TrainWithCommentary``; ``None`` if this method's teachers cannot teach a student."""
        return None

    @classmethod
    def population_refusal(cls, options):
        """None if runs of this method with ``options`` (its ``teaching``
        section) over seeds can train as one population
        (:mod:`commentaries.population`), else the one-line reason, naming
        the ``teaching.<key>``."""
        return (f"teaching.class: {options.get('class')} does not run as a population (its outer "
                f"step is not a pure function of its state); run it one seed at a time")


class PureTeachingMethod(TeachingMethod):
    """A method whose outer step is a pure function
    ``pure_outer_step(state, inputs) -> (state, metrics)`` of a tree of
    tensors (the teacher and its outer optimiser's state) and of the step's
    random draws (``outer_inputs(step)``: a fresh student, its batches),
    written with ``torch.func``. A run applies it to its own state; a
    population of seeds applies it once, ``torch.func.vmap``-ed over the
    members' stacked states and draws, so each member computes what it
    would alone. The state must be in :meth:`checkpointed` (the loop saves
    and restores it)."""

    @classmethod
    def population_refusal(cls, options):
        return None

    def outer_state(self):
        raise NotImplementedError

    def load_outer_state(self, state):
        raise NotImplementedError

    def outer_inputs(self, step):
        """The step's random draws, from the run's own generators (never the global stream)."""
        raise NotImplementedError

    def pure_outer_step(self, state, inputs):
        raise NotImplementedError

    def outer_step(self, step, pure_step=None):
        """One outer step by ``pure_step`` (default :meth:`pure_outer_step`;
        e.g. its compiled version) on this run's state and draws."""
        state, metrics = (pure_step or self.pure_outer_step)(self.outer_state(), self.outer_inputs(step))
        self.load_outer_state(state)
        return metrics


def _state_of(value):
    if isinstance(value, torch.Generator):
        return value.get_state()
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _state_of(item) for key, item in value.items()}
    if hasattr(value, "state_dict"):
        return value.state_dict()
    return value


def _load_state(target, state):
    """Restore in place, so optimisers keep pointing at the same tensors (on their device)."""
    if isinstance(target, torch.Generator):
        target.set_state(state)
    elif torch.is_tensor(target):
        with torch.no_grad():
            target.copy_(state)
    elif isinstance(target, dict):
        for key, item in state.items():
            if key in target and (torch.is_tensor(target[key]) or hasattr(target[key], "load_state_dict")
                                  or (isinstance(target[key], dict) and isinstance(item, dict))):
                _load_state(target[key], item)
            else:
                target[key] = item
    else:
        target.load_state_dict(state)


def save_checkpoint(path, method, step, wall_time, means):
    state = {"format": CHECKPOINT_FORMAT, "method": method.state_dict(), "step": step,
             "wall_time_s": wall_time, "random": random_states(), "interval": means.state_dict()}
    checkpoints.write(path, state)


def load_checkpoint(path):
    """A teaching checkpoint (checksummed, read with ``weights_only=True``); ``None`` if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    state = checkpoints.read(path, str(path), map_location="cpu")  # checksummed, weights_only
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a teaching checkpoint")
    return state


class IntervalMeans:
    """Step metrics summed on the device, averaged when logged (no per-step host sync)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics):
        for tag, value in metrics.items():
            value = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[tag] = self.sums[tag] + value if tag in self.sums else value.clone()
            self.counts[tag] = self.counts.get(tag, 0) + 1

    def pop(self):
        means = {tag: total / self.counts[tag] for tag, total in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means

    def state_dict(self):  # a checkpoint between two logs keeps the interval's sums: logs resume exactly
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state):
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])


class Run:
    """One teaching run's machinery around its outer steps: the checkpoint it
    resumes from, the tracker, logs at intervals, divergence, checkpoints,
    the results. :func:`run` feeds it its method's steps one at a time; a
    population (:mod:`commentaries.population`) feeds each member's run the
    member's slice of one vectorised step, so each member logs,
    checkpoints and finishes exactly as it would alone."""

    def __init__(self, method, context):
        self.method, self.context = method, context
        self.checkpoint_path = Path(context.run_dir) / CHECKPOINT
        resumed = load_checkpoint(self.checkpoint_path)
        self.start = self.step = resumed["step"] if resumed else 0
        self.wall_time = resumed["wall_time_s"] if resumed else 0.0
        # the checkpoint at step s was written after step s's logs: purge what came after them only
        context.tracker = self.tracker = Tracker(context.run_dir, purge_step=self.start + 1 if resumed else None)
        method.setup()
        self.means = IntervalMeans()
        if resumed:
            try:
                method.load_state_dict(resumed["method"])
                self.means.load_state_dict(resumed["interval"])
            except (KeyError, RuntimeError, ValueError, TypeError) as error:
                raise UserError(f"{self.checkpoint_path}: not a checkpoint of this teaching configuration "
                                f"({type(error).__name__})") from None
            restore_random_states(resumed["random"])
        else:
            method.begin()
        self.status = "finished"
        self.compile_time = 0.0
        self.bar = tqdm(total=method.steps, initial=self.start, disable=not context.progress,
                        desc=context.description, unit="step", dynamic_ncols=True, leave=False)
        self.started = time.perf_counter()

    @property
    def running(self):
        return self.status == "finished" and self.step < self.method.steps

    def warm_up(self, call):
        """Compile by calling ``call()`` (one outer step of the compiled pure
        step on the run's state and draws) with the method's state and
        generators restored after it, so the run is untouched; outside the
        timed loop, as ``train.py`` compiles a hyperparameter step."""
        snapshot = self.method.state_dict()

        def compiling():
            started = time.perf_counter()
            try:
                with compiler_failures():
                    call()
            finally:
                self.method.load_state_dict(snapshot)
            return time.perf_counter() - started
        self.compile_time = compile_announced(True, self.context.progress, compiling)
        self.started = time.perf_counter()

    def record(self, metrics):
        """After one outer step with ``metrics``: log at intervals, stop on divergence, checkpoint."""
        method, context = self.method, self.context
        self.means.add(metrics)
        self.step += 1
        self.bar.update()
        if self.step % method.log_interval == 0 or self.step == method.steps:
            interval = self.means.pop()
            for tag, value in {**interval, **method.evaluate(self.step)}.items():
                self.tracker.scalar(tag, value, self.step)
            latest = self.tracker.flush()
            self.bar.set_postfix({tag.split("/")[-1][:5]: f"{latest[tag]:.4g}" for tag in interval},
                                 refresh=False)
            if not all(math.isfinite(latest[tag]) for tag in interval):
                self.status = "diverged"
                return
        if context.checkpoint_every and self.step % context.checkpoint_every == 0 and self.step < method.steps:
            self.save()

    def save(self):
        """The run's state after its current outer step (the logs up to it are
        written; the interval's sums are in the checkpoint): it resumes from the next."""
        save_checkpoint(self.checkpoint_path, self.method, self.step,
                        self.wall_time + time.perf_counter() - self.started, self.means)

    def stop_if_preempted(self):
        """Save and stop if SLURM is preempting the job (as a hyperparameter run does)."""
        if self.running:
            stop_if_preempted(self.context.device, self.save, self.step, unit="outer step")

    def finish(self):
        """The method's final metrics, teacher file and the run's results."""
        method, context, step = self.method, self.context, self.step
        results = {"status": self.status, "dataset": method.dataset_name, "outer_steps_done": step,
                   "resumed_from_step": self.start, "final": {},
                   "objective": context.divergence_penalty, "teaching": {}, "hyperparameters": {},
                   "teacher_file": None}
        if self.status == "finished":
            self.bar.set_description(f"{context.description}: finishing")
            results.update(method.finish(step))
            final = results["final"]
            if not all(math.isfinite(value) for tag, value in final.items() if tag.startswith("Loss/")):
                results["status"] = "diverged"
            else:
                results["objective"] = final["Loss/Validation"]
            for tag, value in final.items():
                self.tracker.scalar(f"Final/{tag}", value, step)
            exported = method.export()
            if exported is not None:
                path = Path(context.run_dir) / storage.FILE_NAME
                results["teacher_file"] = str(storage.save_teacher(path, method=method.name,
                                                                   **exported))
        self.bar.close()
        self.tracker.close()
        results["wall_time_s"] = self.wall_time + time.perf_counter() - self.started
        results["compile_time_s"] = self.compile_time
        return results


@contextlib.contextmanager
def default_dtype(dtype):
    """Networks and teacher tensors built while a run is set up, steps and
    finishes take the run's ``dtype`` (its data are cast when loaded)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run(method, context):
    """Run ``method`` to the end (or to divergence) and return its results."""
    with default_dtype(context.dtype):
        machinery = Run(method, context)
        outer_step = method.outer_step
        if context.compile and not isinstance(method, PureTeachingMethod):
            raise UserError(f"compile: true is not supported for teaching.class: {method.name} (its outer "
                            f"step is not a pure function of its state); use compile: false")
        if context.compile and machinery.running:
            pure_step = compiler(context.device)(method.pure_outer_step)
            machinery.warm_up(lambda: pure_step(method.outer_state(), method.outer_inputs(machinery.step)))
            outer_step = functools.partial(method.outer_step, pure_step=pure_step)
        while machinery.running:
            machinery.record(outer_step(machinery.step))
            machinery.stop_if_preempted()
        return machinery.finish()
