"""Run one training episode with hyperparameters tuned during training.

    python train.py -c configs/uci_energy.yaml configs/Ours_LR_Momentum.yaml \\
        [--set network_weight.lr=-2 ...] [-n NAME] [-g GROUP] [-l LOG_ROOT] \\
        [-d cpu|cuda] [--seed N] [-S SAVE.pt] [-s LOAD.pt]
    python train.py -c DATA.yaml ALGORITHM.yaml --population N [--generator NAME] [--seed S]

Config files stack (later ones win, mappings merge key by key); ``--set``
overrides come last. The run directory ``LOG_ROOT/GROUP/<timestamp>-<NAME>``
receives the resolved ``config.yaml``, TensorBoard logs, checkpoints and
``results.json``. ``main()`` is the same thing as a function, for the fan-out
and Bayesian-optimisation scripts. ``--population N`` trains N runs of one
configuration at once (:mod:`population`, which shares this module's pieces
of a run: run directories, checkpoints, logging, results).
"""
import argparse
import json
import math
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import config as configuration
import datasets
import hyperparameters
import models
import processes
import validate
from engine import Problem, Trainer, denormals_flushed
from errors import CommandLine, UserError, exit_on_user_error
from tracking import Tracker

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def atomic_write(path, write):
    """Write through a temporary file in the same directory, then rename:
    readers never see a half-written file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_json(path, data):
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def make_run_dir(log_root, group, name):
    """``log_root/group/<timestamp>-<name>``, unique even for concurrent runs."""
    parent = Path(log_root) / (group or "default")
    make_directory(parent, f"-l {log_root}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        candidate = parent / f"{stamp}-{name}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"{parent}: could not create a unique run directory")


def make_directory(path, label):
    """``mkdir -p``; one line naming ``label`` if a file is in the way."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{label}: not a directory (a file is in the way of {path})") from None
    except OSError as error:
        raise UserError(f"{label}: cannot create {path} ({error.strerror})") from None


def pick_device(requested, where="device"):
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"{where}: unknown device {requested!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{where}: {requested} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{where}: {requested} requested but only {torch.cuda.device_count()} "
                        f"CUDA device(s) are visible")
    return device


def load_config(config, extra):
    """The resolved, checked configuration of a run: stacked files, then ``extra``
    overrides (``[(dotted key, value, origin)]``), derived settings applied."""
    cfg = prepare(configuration.load(config, extra))
    validate.check(cfg)
    return cfg


def device_and_dtype(cfg):
    return pick_device(cfg["device"], cfg.where("device")), DTYPES[cfg["dtype"]]


def load_problem(cfg, device, dtype):
    data = datasets.load_data(cfg["dataset"], validation_proportion=cfg["validation_proportion"],
                              data_root=cfg["data_root"], where=cfg.where("dataset"))
    data = cast(data.to(device), dtype)
    if cfg["fold_validation_into_training"]:
        data.training_inputs = torch.cat([data.training_inputs, data.validation_inputs])
        data.training_targets = torch.cat([data.training_targets, data.validation_targets])
    return Problem(build_model(cfg, data, device, dtype), build_loss(cfg), data)


def build_model(cfg, data, device, dtype):
    model = models.build_model(cfg["model"], data, where=cfg.where("model"))
    return model.to(device=device, dtype=dtype)


def build_loss(cfg):
    return models.build_loss(cfg["loss"], where=cfg.where("loss"))


def cast(data, dtype):
    for field in ("training_inputs", "training_targets", "validation_inputs",
                  "validation_targets", "test_inputs", "test_targets", "target_scale"):
        value = getattr(data, field, None)
        if torch.is_tensor(value) and value.is_floating_point():
            setattr(data, field, value.to(dtype))
    return data


def random_states():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_random_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path, trainer, cfg, wall_time):
    state = {"trainer": trainer.state_dict(), "config": dict(cfg), "random": random_states(),
             "wall_time_s": wall_time}
    checkpoints.write(path, state)


def load_state(path, trainer, cfg, label=None, restore_random=True):
    """Resume ``trainer`` (a run, or a population's member) from a checkpoint
    (checked: format, checksum, same configuration); returns the wall time it
    had trained. A population member leaves the global random state alone."""
    label = label or str(path)
    state = checkpoints.read(path, label, map_location=trainer.weights[0].device)
    checkpoints.check_matches(state, cfg, label)
    try:
        trainer.load_state_dict(state["trainer"])
        if restore_random:
            restore_random_states(state["random"])
        return float(state["wall_time_s"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise UserError(f"{label}: not a saved state of this configuration "
                        f"({type(error).__name__})") from None


def stop_if_preempted(device, save, step, unit="hyperparameter step"):
    """At a step boundary (``unit``): if SLURM is preempting the job, write
    the current state for the requeued job (``save()``) and stop (see ``processes``)."""
    if not processes.preemption.requested():
        return
    synchronise(device)
    save()
    processes.preemption.saved()
    raise processes.Preempted(f"preempted at {unit} {step}")


class Schedule:
    """Where the outer loop is: the steps it has asked for, counted on the host
    from where the run started or resumed. The run's own counters are in its
    state, advanced by the pure step on the device; reading them waits for
    the device, so the loop counts for itself and never reads them per step."""

    def __init__(self, cfg, hyperparameter_step, weight_step):
        self.total, self.weight_steps = cfg["hyperparameter_steps"], cfg["network_weight_steps"]
        self.interval, self.every = cfg["log_interval"], cfg["checkpoint_every"]
        self.hyperparameter_step, self.weight_step = hyperparameter_step, weight_step
        self.logs = False

    running = property(lambda self: self.hyperparameter_step < self.total)
    done = property(lambda self: self.hyperparameter_step == self.total)

    def advance(self):
        """One hyperparameter step done; ``logs``: it ends a log interval (or the run)."""
        before = self.weight_step
        self.hyperparameter_step += 1
        self.weight_step += self.weight_steps
        self.logs = self.weight_step // self.interval > before // self.interval or self.done

    @property
    def checkpoints(self):
        """A periodic checkpoint is due (none at the end: the results are)."""
        return bool(self.every) and self.hyperparameter_step % self.every == 0 and not self.done


def progress_bar(description, schedule, progress):
    return tqdm(total=schedule.total, initial=schedule.hyperparameter_step, disable=not progress,
                desc=description, unit="hstep", dynamic_ncols=True, leave=False)


def hypergradient_scalars(hypergradients, step):
    """``[(tag, value, step)]`` of one step's hypergradients (device tensors)."""
    return [(f"Hypergradient/{name.title()}", value, step) for name, value in hypergradients.items()]


def log_metrics(tracker, trainer, cfg, step):
    """Queue this interval's metrics (device tensors; written at flush)."""
    tracker.scalar("Loss/Training", trainer.last_training_loss, step)
    indices = (trainer.samplers.log.next() if cfg["validation_evaluation"] == "minibatch"
               else None)
    for tag, value in interval_metrics(trainer.evaluate, cfg, trainer.validation_split,
                                       indices).items():
        tracker.scalar(tag, value, step)
    raw = trainer.state["hyperparameters"]
    for tag, value in hyperparameter_scalars(raw, trainer.summary()).items():
        tracker.scalar(tag, value, step)
    log_histograms(tracker, raw, trainer.program.transforms, step)


def interval_metrics(evaluate, cfg, validation_split, log_indices=None):
    """``{"Loss/Test": tensor, ...}``: test metrics and, unless
    ``validation_evaluation: end``, validation metrics (on ``log_indices``
    for ``minibatch``). ``evaluate(split, indices)``: a run's, or a
    population's (then every value has one entry per member)."""
    evaluations = {"Test": evaluate("test", None)}
    if cfg["validation_evaluation"] != "end":
        evaluations["Validation"] = evaluate(validation_split, log_indices)
    return {f"{metric}/{split}": value for split, metrics in evaluations.items()
            for metric, value in metrics.items()}


def hyperparameter_scalars(raw, summary):
    """``{tag: value}`` of ``Hyperparameter/*`` from ``hyperparameters.summary``:
    the natural value, or a per-weight one's mean (``_Mean``)."""
    return {f"Hyperparameter/{name.title()}" + ("_Mean" if isinstance(raw[name], tuple) else ""):
            value for name, value in summary.items()}


def log_histograms(tracker, raw, transforms, step):
    """A histogram of each per-weight hyperparameter's natural values."""
    per_weight = {name: value for name, value in raw.items() if isinstance(value, tuple)}
    for name, natural in hyperparameters.natural(per_weight, transforms).items():
        tracker.histogram(f"Hyperparameter/{name.title()}",
                          torch.cat([v.reshape(-1) for v in natural]), step)


def final_metric_tensors(evaluate, validation_split):
    """``{"Loss/Training": tensor, ...}`` on the whole training, validation and
    test splits. ``evaluate(split)``: a run's (0-d values) or a population's
    (one entry per member)."""
    final, evaluated = {}, {}
    for split, label in (("training", "Training"), (validation_split, "Validation"),
                         ("test", "Test")):
        if split not in evaluated:  # validation is the training split without a validation set
            evaluated[split] = evaluate(split)
        for metric, value in evaluated[split].items():
            final[f"{metric}/{label}"] = value
    return final


def final_metrics(trainer):
    final = final_metric_tensors(trainer.evaluate, trainer.validation_split)
    names = list(final)
    values = torch.stack([v.to(torch.float64).reshape(()) for v in final.values()]).tolist()
    return dict(zip(names, values))


def hyperparameter_values(trainer):
    summary = trainer.summary()
    values = torch.stack([v.to(torch.float64) for v in summary.values()]).tolist()
    return dict(zip(summary, values))


def prepare(cfg):
    """Apply derived settings: Baydin et al.'s one weight step per update."""
    if cfg["force_single_network_weight_step"]:
        cfg["hyperparameter_steps"] *= cfg["network_weight_steps"]
        cfg["network_weight_steps"] = 1
    return cfg


def compile_announced(compiled, progress, warm_up):
    """``warm_up()`` (``compile: true`` compiles there, outside the timed
    loop), said on stderr when a progress bar is shown: the bar would
    otherwise stand still at 0 for the whole compilation. Returns its seconds."""
    if not compiled:
        return 0.0
    if progress:  # tqdm.write: above a bar already shown (the teaching loop's)
        tqdm.write("compile: true: compiling before training (about 35 s the first time on a "
                   "CPU, a few seconds with a warm cache) ...", file=sys.stderr)
    seconds = warm_up()
    if progress:
        tqdm.write(f"compiled in {seconds:.1f} s", file=sys.stderr)
    return seconds


def run_training(cfg, run_dir, device, dtype, progress, save, load):
    problem = load_problem(cfg, device, dtype)
    trainer = Trainer(cfg, problem, device, dtype)
    checkpoint_path = run_dir / CHECKPOINT
    wall_time = 0.0
    resume_from = checkpoint_path if checkpoint_path.is_file() else load
    if resume_from:
        label = str(checkpoint_path) if resume_from == checkpoint_path else f"-s {load}"
        wall_time = load_state(resume_from, trainer, cfg, label)
    tracker = open_tracker(run_dir, cfg, trainer.weight_step if resume_from else None)
    compile_time = compile_announced(trainer.compiled, progress, trainer.warm_up)
    status = run_loop(trainer, cfg, tracker, checkpoint_path, progress, wall_time)
    results = finish(trainer, cfg, tracker, status, run_dir, save)
    results["compile_time_s"] = compile_time
    return results


def run_loop(trainer, cfg, tracker, checkpoint_path, progress, wall_time):
    """The outer loop; returns (status, wall time of the loop in seconds)."""
    schedule = Schedule(cfg, trainer.hyperparameter_step, trainer.weight_step)
    bar = progress_bar(cfg["algorithm"], schedule, progress)
    device = trainer.weights[0].device
    synchronise(device)
    started = time.perf_counter()
    elapsed = lambda: wall_time + time.perf_counter() - started  # noqa: E731

    def save():  # what is logged up to this step is on disk before the state that resumes after it
        tracker.flush()
        save_state(checkpoint_path, trainer, cfg, elapsed())

    status = "finished"
    while schedule.running:
        trainer.step()
        schedule.advance()
        for tag, value, step in hypergradient_scalars(trainer.last_hypergradients,
                                                      schedule.weight_step):
            tracker.scalar(tag, value, step)
        bar.update(1)
        if schedule.logs:
            log_metrics(tracker, trainer, cfg, schedule.weight_step)
            latest = tracker.flush()
            bar.set_postfix({k.split("/")[1][:5]: f"{latest[k]:.4g}"
                             for k in ("Loss/Training", "Loss/Validation", "Loss/Test")
                             if k in latest}, refresh=False)
            if not math.isfinite(latest["Loss/Training"]):
                status = "diverged"
                break
        if schedule.checkpoints:
            synchronise(device)
            save()
        stop_if_preempted(device, save, schedule.hyperparameter_step)  # after this step's logs
    synchronise(device)
    bar.close()
    return status, elapsed()


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finish(trainer, cfg, tracker, status_and_time, run_dir, save, final=None):
    """The run's results (``final``: its final metrics if already evaluated)."""
    status, wall_time = status_and_time
    final = final_metrics(trainer) if final is None else final
    if not all(math.isfinite(v) for k, v in final.items() if k.startswith("Loss/")):
        status = "diverged"
    objective = final.get("Loss/Validation", math.nan)
    if status == "diverged" or not math.isfinite(objective):
        objective = cfg["divergence_penalty"]
    weight_step = trainer.weight_step
    for tag, value in final.items():
        tracker.writer.add_scalar(f"Final/{tag}", value, weight_step)
    tracker.close()
    results = {
        "status": status, "algorithm": cfg["algorithm"],
        "dataset": cfg["dataset"].get("class") if "dataset" in cfg else None,
        "seed": cfg["seed"], "run_dir": str(run_dir),
        "network_weight_steps_done": weight_step,
        "hyperparameter_steps_done": trainer.hyperparameter_step,
        "wall_time_s": wall_time, "final": final,
        "hyperparameters": hyperparameter_values(trainer), "objective": objective,
    }
    if save:
        save_state(Path(save), trainer, cfg, wall_time)
    return results


def open_tracker(run_dir, cfg, resumed_at=None):
    """A run's TensorBoard logs; a fresh run is entered in the HParams view.

    A resumed run's (``resumed_at``: the weight step s of its checkpoint)
    keep what was logged up to s and lose what came after: a checkpoint is
    written after everything logged at its step s is on disk (see
    :func:`run_loop`), and the resumed run logs from step s + 1 on, so the
    purge starts there (TensorBoard hides the events at steps >= purge_step
    written before it). A purge at s would hide step s's logs for good."""
    tracker = Tracker(run_dir, purge_step=None if resumed_at is None else resumed_at + 1)
    if resumed_at is None:
        tracker.hparams(hparam_summary(cfg), ["Loss/Test", "Loss/Validation", "Loss/Training"])
    return tracker


def hparam_summary(cfg):
    summary = {"algorithm": cfg["algorithm"], "seed": cfg["seed"]}
    for key, value in cfg["network_weight"].items():
        summary[f"network_weight.{key}"] = value
    return summary


def run_teaching(cfg, run_dir, device, progress):
    """A ``teaching`` config: the method's own loop settings come from its
    section; logging, divergence, checkpoints and resume from the run's keys."""
    import commentaries
    from commentaries.loop import Context

    context = Context.from_config(cfg, run_dir, device, progress)
    try:
        results = commentaries.run(cfg["teaching"], context, where=cfg.where("teaching"))
    except UserError as error:  # deep checks know the key; name its file too
        raise UserError(configuration.locate(cfg, str(error))) from None
    results.update(algorithm=cfg["algorithm"], seed=cfg["seed"], run_dir=str(run_dir))
    return results


def main(config, overrides=None, *, name=None, group=None, log_root="runs", device=None,
         seed=None, save=None, load=None, run_dir=None, progress=True, skip_if_done=False):
    """Run one episode; returns the results written to ``run_dir/results.json``.

    ``config`` is a list of YAML paths (stacked in order) or a mapping;
    ``overrides`` a mapping of dotted keys to values or ``key=value`` strings.
    The run directory is locked while the run is in it; a second call for the
    same directory waits, and then (or always, with ``skip_if_done``) returns
    the results already there instead of training again.
    Raises :class:`errors.UserError` for bad input.
    """
    extra = configuration.normalise_overrides(overrides)
    if seed is not None:
        extra.append(("seed", seed, "--seed"))
    if device is not None:
        extra.append(("device", device, "--device"))
    cfg = load_config(config, extra)
    torch_device, dtype = device_and_dtype(cfg)
    check_paths(save, load, run_dir)
    torch.manual_seed(cfg["seed"])
    if run_dir is None:
        run_dir = make_run_dir(log_root, group, name or cfg["algorithm"])
    run_dir = Path(run_dir)
    make_directory(run_dir, f"--run-dir {run_dir}")
    note = (lambda: print(f"{run_dir}: another process is running there; waiting for it",
                          file=sys.stderr, flush=True)) if progress else None
    with processes.run_directory_lock(run_dir, on_wait=note) as waited:
        done = finished_results(run_dir) if (waited or skip_if_done) else None
        if done is not None:
            return done
        clear_failed_attempt(run_dir, resuming=bool(load))
        write_config(run_dir, cfg)
        with denormals_flushed(cfg["flush_denormal"]):
            if "teaching" in cfg:
                results = run_teaching(cfg, run_dir, torch_device, progress)
            else:
                results = run_training(cfg, run_dir, torch_device, dtype, progress, save, load)
        results["host"] = socket.gethostname()
        write_json(run_dir / RESULTS, results)
        # The results are safe on disk; the checkpoint has done its job.
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return results


def check_paths(save, load, run_dir):
    """Flags that name files, checked before any training: a ``-S`` into a
    missing directory would lose the run's state at the very end."""
    if save is not None:
        target = Path(save)
        if target.is_dir():
            raise UserError(f"-S {save}: is a directory; give a file name")
        if not target.parent.is_dir():
            raise UserError(f"-S {save}: directory {target.parent} does not exist")
    if load is not None and not Path(load).is_file():
        reason = "is a directory, not a saved state" if Path(load).is_dir() else "saved state not found"
        raise UserError(f"-s {load}: {reason}")
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise UserError(f"--run-dir {run_dir}: not a directory")


def finished_results(run_dir):
    """The results of a run that already ended in ``run_dir`` (finished or diverged), else None."""
    try:
        results = json.loads((Path(run_dir) / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("status") in ("finished", "diverged") else None


def clear_failed_attempt(run_dir, resuming=False):
    """What a killed attempt left in ``run_dir`` (the caller holds its lock):
    temporary files, and its TensorBoard files if it left no checkpoint (its
    steps are redone) and the run does not resume from ``-s``."""
    checkpoints.remove_stale_temporaries(run_dir)
    if not (Path(run_dir) / CHECKPOINT).is_file() and not resuming:
        for path in Path(run_dir).glob("events.out.tfevents.*"):
            path.unlink(missing_ok=True)


def write_config(run_dir, cfg):
    """The resolved ``config.yaml``: rerunning it with ``train.py -c`` reproduces the run."""
    text = configuration.to_yaml(cfg)
    atomic_write(Path(run_dir) / "config.yaml", lambda path: path.write_text(text))


def parse_arguments(argv):
    parser = CommandLine(prog="train.py", description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", nargs="+", required=True, help="YAML files, stacked")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted keys; YAML values)")
    parser.add_argument("-n", "--name", help="run name (default: the algorithm)")
    parser.add_argument("-g", "--group", help="group directory under the log root")
    parser.add_argument("-l", "--log-root", default="runs", help="default: ./runs")
    parser.add_argument("-d", "--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=int, help="random seed (model init, data order)")
    parser.add_argument("-S", "--save", help="save the full training state here at the end")
    parser.add_argument("-s", "--load", help="resume from a saved state")
    parser.add_argument("--run-dir", help="use exactly this run directory (resumes from its "
                                          "checkpoint if there is one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--population", type=int, metavar="N",
                        help="train N members at once as one vectorised population, each with "
                             "its own hyperparameter initialisation and seed from --generator "
                             "(seeded by --seed) and its own run directory")
    parser.add_argument("--generator", help="with --population: the initialisations' generator "
                                            "(default natural_sgd; for a teaching config iteration_id: "
                                            "seeds S, S+1, ...; as parallel_exec.py)")
    return parser.parse_args(argv)


@exit_on_user_error
def cli(argv=None):
    arguments = parse_arguments(argv)
    if arguments.population is not None:
        import population  # imports this module's pieces of a run
        return population.cli(arguments)
    if arguments.generator is not None:
        raise UserError("--generator: only with --population N")
    results = main(arguments.config, arguments.set, name=arguments.name, group=arguments.group,
                   log_root=arguments.log_root, device=arguments.device, seed=arguments.seed,
                   save=arguments.save, load=arguments.load, run_dir=arguments.run_dir,
                   progress=not arguments.quiet)
    summary = ", ".join(f"{k} {v:.5g}" for k, v in results.get("final", {}).items())
    print(f"{results['status']}: {summary}")
    print(f"run directory: {results['run_dir']}")
    return 0 if results["status"] in ("finished", "diverged") else 1


if __name__ == "__main__":
    sys.exit(cli())
