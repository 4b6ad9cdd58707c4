"""Run one training episode with hyperparameters tuned during training.

    python train.py -c configs/uci_energy.yaml configs/Ours_LR_Momentum.yaml \\
        [--set network_weight.lr=-2 ...] [-n NAME] [-g GROUP] [-l LOG_ROOT] \\
        [-d cpu|cuda] [--seed N] [-S SAVE.pt] [-s LOAD.pt]

Config files stack (later ones win, mappings merge key by key); ``--set``
overrides come last. The run directory ``LOG_ROOT/GROUP/<timestamp>-<NAME>``
receives the resolved ``config.yaml``, TensorBoard logs, checkpoints and
``results.json``. ``main()`` is the same thing as a function, for the fan-out
and Bayesian-optimisation scripts.
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
import models
import processes
import validate
from engine import Problem, Trainer
from errors import CommandLine, UserError, exit_on_user_error
from tracking import Tracker

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"


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


def load_problem(cfg, device, dtype):
    data = datasets.load_data(cfg["dataset"], validation_proportion=cfg["validation_proportion"],
                              data_root=cfg["data_root"], where=cfg.where("dataset"))
    data = cast(data.to(device), dtype)
    if cfg["fold_validation_into_training"]:
        data.training_inputs = torch.cat([data.training_inputs, data.validation_inputs])
        data.training_targets = torch.cat([data.training_targets, data.validation_targets])
    model = models.build_model(cfg["model"], data, where=cfg.where("model"))
    model = model.to(device=device, dtype=dtype)
    loss_function = models.build_loss(cfg["loss"], where=cfg.where("loss"))
    return Problem(model, loss_function, data)


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


def load_state(path, trainer, cfg, label=None):
    """Resume ``trainer`` from a checkpoint (checked: format, checksum, same
    configuration); returns the wall time it had trained."""
    label = label or str(path)
    state = checkpoints.read(path, label, map_location=trainer.weights[0].device)
    checkpoints.check_matches(state, cfg, label)
    try:
        trainer.load_state_dict(state["trainer"])
        restore_random_states(state["random"])
        return float(state["wall_time_s"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise UserError(f"{label}: not a saved state of this configuration "
                        f"({type(error).__name__})") from None


def save_if_preempted(trainer, cfg, checkpoint_path, wall_time):
    """At a hyperparameter-step boundary: if SLURM is preempting the job, write
    the current state for the requeued job and stop (see ``processes``)."""
    if not processes.preemption.requested():
        return
    synchronise(trainer)
    save_state(checkpoint_path, trainer, cfg, wall_time)
    processes.preemption.saved()
    raise processes.Preempted(f"preempted at hyperparameter step {trainer.hyperparameter_step}")


def log_metrics(tracker, trainer, cfg):
    """Queue this interval's metrics (device tensors; written at flush)."""
    step = trainer.weight_step
    tracker.scalar("Loss/Training", trainer.last_training_loss, step)
    evaluations = {"Test": trainer.evaluate("test")}
    if cfg["validation_evaluation"] == "full":
        evaluations["Validation"] = trainer.evaluate(trainer.validation_split)
    elif cfg["validation_evaluation"] == "minibatch":
        evaluations["Validation"] = trainer.evaluate(trainer.validation_split, trainer.log_sampler.next())
    for split, metrics in evaluations.items():
        for metric, value in metrics.items():
            tracker.scalar(f"{metric}/{split}", value, step)
    for name, value in trainer.hyperparameters.summary().items():
        tag = f"Hyperparameter/{name.title()}"
        raw = trainer.hyperparameters.raw[name]
        if isinstance(raw, tuple):
            natural = trainer.hyperparameters.natural_detached()[name]
            tracker.histogram(tag, torch.cat([v.reshape(-1) for v in natural]), step)
            tag += "_Mean"
        tracker.scalar(tag, value, step)


def final_metrics(trainer):
    final = {}
    for split, label in (("training", "Training"), (trainer.validation_split, "Validation"),
                         ("test", "Test")):
        for metric, value in trainer.evaluate(split).items():
            final[f"{metric}/{label}"] = value
    names = list(final)
    values = torch.stack([v.to(torch.float64).reshape(()) for v in final.values()]).tolist()
    return dict(zip(names, values))


def hyperparameter_values(trainer):
    summary = trainer.hyperparameters.summary()
    values = torch.stack([v.to(torch.float64) for v in summary.values()]).tolist()
    return dict(zip(summary, values))


def prepare(cfg):
    """Apply derived settings: Baydin et al.'s one weight step per update."""
    if cfg["force_single_network_weight_step"]:
        cfg["hyperparameter_steps"] *= cfg["network_weight_steps"]
        cfg["network_weight_steps"] = 1
    return cfg


def run_training(cfg, run_dir, device, dtype, progress, save, load):
    problem = load_problem(cfg, device, dtype)
    trainer = Trainer(cfg, problem, device, dtype)
    checkpoint_path = run_dir / CHECKPOINT
    wall_time = 0.0
    resume_from = checkpoint_path if checkpoint_path.is_file() else load
    if resume_from:
        label = str(checkpoint_path) if resume_from == checkpoint_path else f"-s {load}"
        wall_time = load_state(resume_from, trainer, cfg, label)
    tracker = Tracker(run_dir, purge_step=trainer.weight_step if resume_from else None)
    if not resume_from:
        tracker.hparams(hparam_summary(cfg), ["Loss/Test", "Loss/Validation", "Loss/Training"])
    if trainer.compiled is not None and progress:
        print("compile: true: compiling before training (about 35 s the first time on a CPU, "
              "a few seconds with a warm cache) ...", file=sys.stderr, flush=True)
    compile_time = trainer.warm_up()  # compile: true compiles here, outside the timed loop
    if trainer.compiled is not None and progress:
        print(f"compiled in {compile_time:.1f} s", file=sys.stderr, flush=True)
    status = run_loop(trainer, cfg, tracker, checkpoint_path, progress, wall_time)
    results = finish(trainer, cfg, tracker, status, run_dir, save)
    results["compile_time_s"] = compile_time
    return results


def run_loop(trainer, cfg, tracker, checkpoint_path, progress, wall_time):
    """The outer loop; returns (status, wall time of the loop in seconds)."""
    total = cfg["hyperparameter_steps"]
    interval, every = cfg["log_interval"], cfg["checkpoint_every"]
    status = "finished"
    bar = tqdm(total=total, initial=trainer.hyperparameter_step, disable=not progress,
               desc=f"{cfg['algorithm']}", unit="hstep", dynamic_ncols=True, leave=False)
    synchronise(trainer)
    started = time.perf_counter()
    while trainer.hyperparameter_step < total:
        before = trainer.weight_step
        trainer.step()
        for name, value in trainer.last_hypergradients.items():
            tracker.scalar(f"Hypergradient/{name.title()}", value, trainer.weight_step)
        bar.update(1)
        save_if_preempted(trainer, cfg, checkpoint_path, wall_time + time.perf_counter() - started)
        done = trainer.hyperparameter_step == total
        if trainer.weight_step // interval > before // interval or done:
            log_metrics(tracker, trainer, cfg)
            latest = tracker.flush()
            bar.set_postfix({k.split("/")[1][:5]: f"{latest[k]:.4g}"
                             for k in ("Loss/Training", "Loss/Validation", "Loss/Test")
                             if k in latest}, refresh=False)
            if not math.isfinite(latest["Loss/Training"]):
                status = "diverged"
                break
        if every and trainer.hyperparameter_step % every == 0 and not done:
            synchronise(trainer)
            save_state(checkpoint_path, trainer, cfg, wall_time + time.perf_counter() - started)
    synchronise(trainer)
    bar.close()
    return status, wall_time + time.perf_counter() - started


def synchronise(trainer):
    if trainer.weights[0].is_cuda:
        torch.cuda.synchronize()


def finish(trainer, cfg, tracker, status_and_time, run_dir, save):
    status, wall_time = status_and_time
    final = final_metrics(trainer)
    if not all(math.isfinite(v) for k, v in final.items() if k.startswith("Loss/")):
        status = "diverged"
    objective = final.get("Loss/Validation", math.nan)
    if status == "diverged" or not math.isfinite(objective):
        objective = cfg["divergence_penalty"]
    for tag, value in final.items():
        tracker.writer.add_scalar(f"Final/{tag}", value, trainer.weight_step)
    tracker.close()
    results = {
        "status": status, "algorithm": cfg["algorithm"],
        "dataset": cfg["dataset"].get("class") if "dataset" in cfg else None,
        "seed": cfg["seed"], "run_dir": str(run_dir),
        "network_weight_steps_done": trainer.weight_step,
        "hyperparameter_steps_done": trainer.hyperparameter_step,
        "wall_time_s": wall_time, "final": final,
        "hyperparameters": hyperparameter_values(trainer), "objective": objective,
    }
    if save:
        save_state(Path(save), trainer, cfg, wall_time)
    return results


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

    context = Context(run_dir=run_dir, device=device, seed=cfg["seed"], progress=progress,
                      description=cfg["algorithm"], checkpoint_every=cfg["checkpoint_every"],
                      divergence_penalty=cfg["divergence_penalty"],
                      validation_proportion=cfg["validation_proportion"], data_root=cfg["data_root"])
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
    cfg = prepare(configuration.load(config, extra))
    validate.check(cfg)
    torch_device = pick_device(cfg["device"], cfg.where("device"))
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]]
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
        checkpoints.remove_stale_temporaries(run_dir)
        if not (run_dir / CHECKPOINT).is_file() and not load:
            remove_event_files(run_dir)  # an attempt killed before its first checkpoint
        atomic_write(run_dir / "config.yaml", lambda p: p.write_text(configuration.to_yaml(cfg)))
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


def remove_event_files(run_dir):
    """TensorBoard files of an attempt that left no checkpoint: its steps are redone."""
    for path in Path(run_dir).glob("events.out.tfevents.*"):
        path.unlink(missing_ok=True)


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
    return parser.parse_args(argv)


@exit_on_user_error
def cli(argv=None):
    arguments = parse_arguments(argv)
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
