"""Run one training episode with hyperparameters tuned during training.

    python train.py -c configs/uci_energy.yaml configs/Ours_LR_Momentum.yaml \\
        [--set network_weight.lr=-2 ...] [-n NAME] [-g GROUP] [-l LOG_ROOT] \\
        [-d cpu|cuda] [--seed N] [-S SAVE.pt] [-s LOAD.pt]
    python train.py -c DATA.yaml ALGORITHM.yaml --population N [--generator NAME] [--seed S]

Config files stack (later ones win, mappings merge key by key); ``--set``
overrides come last. The run directory ``LOG_ROOT/GROUP/<timestamp>-<NAME>``
receives the resolved ``config.yaml``, TensorBoard logs, checkpoints and
``results.json``. ``main()`` is the same thing as a function, for the fan-out
and Bayesian-optimisation scripts. ``--population N`` (``main_population()``)
trains N runs of one configuration at once, as one ``torch.func.vmap`` over
the pure step, each member with its own initialisation, seed and run
directory.
"""
import argparse
import contextlib
import functools
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
from engine import (Problem, Sampled, Trainer, build_program, compile_by_calling,
                    compile_refusal, compiler, initial_state, keep_freed_memory,
                    shaped_batches)
from errors import CommandLine, UserError, exit_on_user_error
from step import member as member_state
from step import stack, vectorised
from trees import tree_map
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
    indices = (trainer.samplers.log.next() if cfg["validation_evaluation"] == "minibatch"
               else None)
    for tag, value in interval_metrics(trainer, cfg, indices).items():
        tracker.scalar(tag, value, step)
    log_hyperparameters(tracker, trainer.state["hyperparameters"], trainer.program.transforms,
                        step)


def interval_metrics(trainer, cfg, log_indices=None):
    """``{"Loss/Test": tensor, ...}``: test metrics and, unless
    ``validation_evaluation: end``, validation metrics (on ``log_indices``
    for ``minibatch``)."""
    evaluations = {"Test": trainer.evaluate("test")}
    if cfg["validation_evaluation"] != "end":
        evaluations["Validation"] = trainer.evaluate(trainer.validation_split, log_indices)
    return {f"{metric}/{split}": value for split, metrics in evaluations.items()
            for metric, value in metrics.items()}


def log_hyperparameters(tracker, raw, transforms, step):
    """``Hyperparameter/*``: the natural value, or for a per-weight one a
    histogram and its mean."""
    natural = hyperparameters.natural(raw, transforms)
    for name, value in hyperparameters.summary(raw, transforms).items():
        tag = f"Hyperparameter/{name.title()}"
        if isinstance(raw[name], tuple):
            tracker.histogram(tag, torch.cat([v.reshape(-1) for v in natural[name]]), step)
            tag += "_Mean"
        tracker.scalar(tag, value, step)


def final_metrics(trainer):
    final, evaluated = {}, {}
    for split, label in (("training", "Training"), (trainer.validation_split, "Validation"),
                         ("test", "Test")):
        if split not in evaluated:  # validation is the training split without a validation set
            evaluated[split] = trainer.evaluate(split)
        for metric, value in evaluated[split].items():
            final[f"{metric}/{label}"] = value
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
    if trainer.compiled and progress:
        print("compile: true: compiling before training (about 35 s the first time on a CPU, "
              "a few seconds with a warm cache) ...", file=sys.stderr, flush=True)
    compile_time = trainer.warm_up()  # compile: true compiles here, outside the timed loop
    if trainer.compiled and progress:
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


# ------------------------------------------------------------------ populations

POPULATION_VARYING = ("seed",)  # plus network_weight's hyperparameter values


class Member:
    """One member of a population, seen as a single run (the interface of
    :class:`engine.Trainer` that logging, checkpoints and results use): its
    slice of the population's state, its own samplers and counters."""

    def __init__(self, cfg, program, state, samplers, run_dir, index):
        self.config, self.program, self.state = cfg, program, state
        self.samplers, self.run_dir, self.index = samplers, Path(run_dir), index
        self.hyperparameter_step = self.weight_step = 0
        self.tracker, self.wall_time = None, 0.0

    validation_split = property(lambda self: self.program.validation_split)
    weights = property(lambda self: self.state["weights"])
    last_training_loss = property(lambda self: self.state["last_training_loss"])
    summary = Trainer.summary
    evaluate = Trainer.evaluate
    state_dict = Trainer.state_dict
    load_state_dict = Trainer.load_state_dict


def population_refusal(config, overrides=None):
    """None if this configuration can run as a vectorised population, else
    the one-line reason, naming the key."""
    cfg = prepare(configuration.load(config, configuration.normalise_overrides(overrides)))
    if "teaching" in cfg:
        return (f"{cfg.where('teaching')}: learning-to-teach methods do not run as a "
                f"population (they train their own students); run them one at a time")
    device = pick_device(cfg["device"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]]
    torch.manual_seed(cfg["seed"])
    problem = load_problem(cfg, device, dtype)
    return model_refusal(problem.model, cfg)


def model_refusal(model, cfg):
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        key = "model.batch_norm" if cfg["model"].get("batch_norm") else "model"
        return (f"{cfg.where(key)}: a population cannot vectorise a model with buffers "
                f"({', '.join(buffers[:3])}{', ...' if len(buffers) > 3 else ''}: batch-norm "
                f"statistics are updated in place); run it one run at a time")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.RNNBase):
            key = "model.fused" if "fused" in cfg["model"] else "model"
            return (f"{cfg.where(key)}: {name or 'the model'} is an nn.{type(module).__name__}, "
                    f"whose fused kernel does not vectorise (model.fused: false uses tensor "
                    f"operations)")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            key = "model.dropout" if "dropout" in cfg["model"] else "model"
            return (f"{cfg.where(key)}: dropout ({name}, p={module.p}) draws its masks from "
                    f"the global random stream, which a population cannot share out as the "
                    f"runs alone would; set its dropout to 0 or run one at a time")
    return None


def strip_varying(cfg, optimiser_names):
    """A member's configuration without what may differ between members."""
    stripped = {key: value for key, value in cfg.items() if key not in POPULATION_VARYING}
    stripped["network_weight"] = {key: value for key, value in cfg["network_weight"].items()
                                  if key not in optimiser_names}
    return stripped


def differing_key(reference, other, prefix=""):
    """The first dotted key whose value differs between two mappings."""
    for key in sorted(set(reference) | set(other), key=str):
        a, b = reference.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = differing_key(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def build_members(config, members, log_root, group, device):
    """Resolved configurations, checks, the shared problem and program, and
    one :class:`Member` per entry (fresh, or resumed from its checkpoint)."""
    cfgs = []
    for entry in members:
        extra = configuration.normalise_overrides(entry.get("overrides"))
        if device is not None:
            extra.append(("device", device))
        cfg = prepare(configuration.load(config, extra))
        validate.check(cfg)
        cfgs.append(cfg)
    first = cfgs[0]
    if "teaching" in first:
        raise UserError(population_refusal(config, members[0].get("overrides")))
    torch_device = pick_device(first["device"], first.where("device"))
    dtype = {"float32": torch.float32, "float64": torch.float64}[first["dtype"]]
    torch.manual_seed(first["seed"])
    problem = load_problem(first, torch_device, dtype)
    refusal = model_refusal(problem.model, first)
    if refusal:
        raise UserError(refusal)
    if first["compile"]:
        refusal = compile_refusal(problem, first)
        if refusal:
            raise UserError(refusal)
    program, _ = build_program(first, problem, torch_device, dtype)
    names = set(program.optimiser.hyperparameters)
    reference = strip_varying(first, names)
    built = []
    for index, (cfg, entry) in enumerate(zip(cfgs, members)):
        key = differing_key(reference, strip_varying(cfg, names))
        if key:
            raise UserError(f"{cfg.where(key)}: population members may differ only in "
                            f"{', '.join(sorted(names))} (network_weight) and seed")
        _, initial = build_program(cfg, problem, torch_device, dtype)
        torch.manual_seed(cfg["seed"])  # as train.main: the same initial weights as alone
        model = build_model(cfg, problem.data, torch_device, dtype)
        weights = tuple(p.detach().clone() for p in model.parameters())
        state = initial_state(program, cfg, weights, {}, initial, torch_device, dtype)
        samplers = Sampled(problem, cfg["batch_size"], cfg["seed"], torch_device,
                           program.validation_split)
        run_dir = entry.get("run_dir")
        if run_dir is None:
            run_dir = make_run_dir(log_root, group, entry.get("name") or cfg["algorithm"])
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        text = configuration.to_yaml(cfg)
        atomic_write(run_dir / "config.yaml", lambda p, t=text: p.write_text(t))
        member = Member(cfg, program, state, samplers, run_dir, index)
        resumed = (run_dir / CHECKPOINT).is_file()
        if resumed:
            member.wall_time = load_state(run_dir / CHECKPOINT, member, cfg,
                                               restore_random=False)
        member.tracker = Tracker(run_dir, purge_step=member.weight_step if resumed else None)
        if not resumed:
            member.tracker.hparams(hparam_summary(cfg),
                                   ["Loss/Test", "Loss/Validation", "Loss/Training"])
        built.append(member)
    return first, program, built, torch_device


def stacked_indices(members, draw):
    """Each member's indices from ``draw(member)``, stacked (None: whole split)."""
    indices = [draw(member) for member in members]
    return None if indices[0] is None else torch.stack(indices)


def population_batches(members, program, network_weight_steps):
    return {"training": [stacked_indices(members, lambda m: m.samplers.training.next())
                         for _ in range(network_weight_steps)],
            "validation": (stacked_indices(members, lambda m: m.samplers.validation.next())
                           if program.recorded else None)}


def freeze(alive, new, old):
    """``new`` for live members, ``old`` for frozen ones (a mask, no sync)."""
    def select(n, o):
        mask = alive.reshape(alive.shape + (1,) * (n.dim() - 1))
        return torch.where(mask, n, o)
    return tree_map(select, new, old)


def run_population(cfg, program, members, device, progress):
    """Train ``members`` (all at the same step) as one vectorised population;
    returns each member's results, in order."""
    count = len(members)
    transform = vectorised
    if cfg["compile"]:
        compile_ = compiler(device)
        transform = lambda function: compile_(vectorised(function))  # noqa: E731
    population = program.wrapped(transform)
    state = stack([member.state for member in members])
    network_weight_steps = cfg["network_weight_steps"]
    compile_time = 0.0
    if cfg["compile"]:
        compile_time = warm_up_population(population, state, members, program,
                                          network_weight_steps)
    evaluate = {split: vectorised(functools.partial(_evaluate, program, split,
                                                    cfg["evaluation_batch_size"]))
                for split in {"test", program.validation_split}}
    alive = torch.ones(count, dtype=torch.bool, device=device)
    live = list(range(count))
    total, interval, every = (cfg["hyperparameter_steps"], cfg["log_interval"],
                              cfg["checkpoint_every"])
    step_count = members[0].hyperparameter_step
    weight_count = members[0].weight_step
    results = [None] * count
    bar = tqdm(total=total, initial=step_count, disable=not progress,
               desc=f"{cfg['algorithm']} x{count}", unit="hstep", dynamic_ncols=True,
               leave=False)
    synchronise_device(device)
    started = time.perf_counter()
    pending = []  # (tag, tensor over members, weight step)
    while step_count < total and live:
        before = weight_count
        new_state, metrics = population.step(state, population_batches(members, program,
                                                                          network_weight_steps))
        state = new_state if len(live) == count else freeze(alive, new_state, state)
        step_count += 1
        weight_count += network_weight_steps
        for name, value in metrics["hypergradients"].items():
            pending.append((f"Hypergradient/{name.title()}", value, weight_count))
        bar.update(1)
        if processes.preemption.requested():  # SLURM is preempting the job: save, then stop
            save_members(members, live, state, step_count, weight_count, device,
                         time.perf_counter() - started)
            processes.preemption.saved()
            raise processes.Preempted(f"preempted at hyperparameter step {step_count}")
        done = step_count == total
        if weight_count // interval > before // interval or done:
            pending.append(("Loss/Training", state["last_training_loss"], weight_count))
            indices = (stacked_indices(members, lambda m: m.samplers.log.next())
                       if cfg["validation_evaluation"] == "minibatch" else None)
            pending.extend((tag, value, weight_count) for tag, value in
                           population_interval_metrics(cfg, program, evaluate, state, indices))
            losses = flush_population(pending, members, live, program, state, weight_count)
            pending = []
            for index in list(live):
                if not math.isfinite(losses[index]):  # frozen from here on; the others go on
                    live.remove(index)
                    alive[index] = False
                    results[index] = finish_member(members[index], state, step_count,
                                                   weight_count, "diverged",
                                                   time.perf_counter() - started, compile_time,
                                                   count)
        if every and step_count % every == 0 and not done:
            save_members(members, live, state, step_count, weight_count, device,
                         time.perf_counter() - started)
    synchronise_device(device)
    elapsed = time.perf_counter() - started
    bar.close()
    for index in live:
        results[index] = finish_member(members[index], state, step_count, weight_count,
                                       "finished", elapsed, compile_time, count)
    return results


def save_members(members, live, state, step_count, weight_count, device, elapsed):
    """Each live member's checkpoint in its own run directory, in the single-run format."""
    synchronise_device(device)
    for index in live:
        member = members[index]
        set_member(member, state, step_count, weight_count)
        save_state(member.run_dir / CHECKPOINT, member, member.config, member.wall_time + elapsed)


def _evaluate(program, split, chunk_size, weights, buffers, indices):
    return program.evaluate(weights, buffers, split, chunk_size, indices)


def population_interval_metrics(cfg, program, evaluate, state, log_indices):
    """``[(tag, tensor over members)]``: as :func:`interval_metrics`, vectorised."""
    splits = [("Test", "test", None)]
    if cfg["validation_evaluation"] != "end":
        splits.append(("Validation", program.validation_split, log_indices))
    tagged = []
    for label, split, indices in splits:
        metrics = evaluate[split](state["weights"], state["buffers"], indices)
        tagged.extend((f"{metric}/{label}", value) for metric, value in metrics.items())
    natural = hyperparameters.natural(state["hyperparameters"], program.transforms)
    for name, value in natural.items():
        if isinstance(value, tuple):
            tagged.append((f"Hyperparameter/{name.title()}_Mean",
                           sum(v.flatten(1).sum(1) for v in value)
                           / sum(v[0].numel() for v in value)))
        else:
            tagged.append((f"Hyperparameter/{name.title()}", value))
    return tagged


def flush_population(pending, members, live, program, state, step):
    """Write the buffered values of the live members to their own
    TensorBoard logs with one host transfer; returns each member's latest
    training loss (NaN for members no longer live)."""
    values = torch.stack([value.to(torch.float64).reshape(len(members))
                          for _, value, _ in pending]).cpu().tolist()
    for index in live:
        member = members[index]
        for (tag, _, at), row in zip(pending, values):
            member.tracker.scalar(tag, row[index], at)
        for name, raw in state["hyperparameters"].items():
            if isinstance(raw, tuple):  # the per-weight histogram, as a single run logs it
                natural = hyperparameters.natural({name: tuple(r[index] for r in raw)},
                                                  program.transforms)[name]
                member.tracker.histogram(f"Hyperparameter/{name.title()}",
                                         torch.cat([v.reshape(-1) for v in natural]), step)
        member.tracker.flush()
    training = next(row for (tag, _, _), row in zip(reversed(pending), reversed(values))
                    if tag == "Loss/Training")
    return [training[index] if index in live else math.nan for index in range(len(members))]


def set_member(member, state, step_count, weight_count):
    """Bring ``member`` up to date with its slice of the population's state."""
    member.state = member_state(state, member.index)
    member.hyperparameter_step, member.weight_step = step_count, weight_count


def finish_member(member, state, step_count, weight_count, status, elapsed, compile_time,
                  population_size):
    """Results of one member as a single run's: final metrics, ``Final/*``
    logs, ``results.json``; its checkpoint has done its job."""
    set_member(member, state, step_count, weight_count)
    results = finish(member, member.config, member.tracker, (status, member.wall_time + elapsed),
                     member.run_dir, None)
    results.update(compile_time_s=compile_time, host=socket.gethostname(),
                   population_size=population_size)
    write_json(member.run_dir / RESULTS, results)
    (member.run_dir / CHECKPOINT).unlink(missing_ok=True)
    return results


def warm_up_population(population, state, members, program, network_weight_steps):
    """Compile the vectorised step before the timed loop (pure: nothing changes)."""
    return compile_by_calling(population, state, shaped_batches(
        members[0].samplers, program, network_weight_steps, state["weights"][0].device,
        members=len(members)))


def synchronise_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allow_open_files(count):
    """Raise the soft limit on open files towards ``count`` (within the hard limit)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass


def main_population(config, members, *, log_root="runs", group=None, device=None, progress=True):
    """Train ``members`` as one vectorised population; returns each member's
    results (as :func:`main` returns, with ``run_dir``), in order.

    ``config``: YAML paths (stacked), shared by all members. ``members``: a
    list of ``{"overrides": {dotted key: value}, "run_dir": str | None,
    "name": str | None}``; members may differ only in the weight
    optimiser's hyperparameter values and ``seed``. Each member writes its
    own run directory exactly as a single run does (``config.yaml`` that
    reproduces it alone, TensorBoard logs, ``results.json``); a member whose
    ``run_dir`` holds a ``checkpoint.pt`` resumes from it (members at
    different steps train as separate populations). Raises
    :class:`errors.UserError` for what cannot run vectorised.
    """
    if not members:
        return []
    allow_open_files(4 * len(members) + 256)  # each member's TensorBoard writer holds files
    keep_freed_memory()  # a population's tensors are large: no page faults for each new one
    results = [None] * len(members)
    with contextlib.ExitStack() as locks:
        pending = []
        for index, entry in enumerate(members):
            done = lock_member_directory(entry.get("run_dir"), locks)
            if done is not None:  # another process finished it while we waited
                results[index] = done
            else:
                pending.append(index)
        if not pending:
            return results
        cfg, program, built, torch_device = build_members(
            config, [members[index] for index in pending], log_root, group, device)
        for step_count in sorted({member.hyperparameter_step for member in built}):
            group_members = [m for m in built if m.hyperparameter_step == step_count]
            for index, member in enumerate(group_members):
                member.index = index
            for member, result in zip(group_members, run_population(cfg, program, group_members,
                                                                    torch_device, progress)):
                results[pending[built.index(member)]] = result
    return results


def lock_member_directory(run_dir, locks):
    """Lock a member's run directory (held in ``locks`` until the population
    ends), as :func:`main` locks a run's; returns the results already there if
    another process finished it while we waited, else None."""
    if run_dir is None:
        return None  # a fresh, unique directory: nobody else can be in it
    run_dir = Path(run_dir)
    make_directory(run_dir, f"run_dir {run_dir}")
    if locks.enter_context(processes.run_directory_lock(run_dir)):
        done = finished_results(run_dir)
        if done is not None:
            return done
    checkpoints.remove_stale_temporaries(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        remove_event_files(run_dir)  # an attempt killed before its first checkpoint
    return None


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
                                            "(default natural_sgd; as parallel_exec.py)")
    return parser.parse_args(argv)


@exit_on_user_error
def cli(argv=None):
    arguments = parse_arguments(argv)
    if arguments.population is not None:
        return population_cli(arguments)
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


def population_cli(arguments):
    """``--population N``: N members from the generator, trained as one population."""
    import generators
    if arguments.population < 1:
        raise UserError(f"--population: must be an integer >= 1, got {arguments.population}")
    for flag, value in (("--run-dir", arguments.run_dir), ("-S/--save", arguments.save),
                        ("-s/--load", arguments.load)):
        if value is not None:
            raise UserError(f"{flag}: not with --population (each member writes, checkpoints "
                            f"and resumes in its own run directory)")
    overrides = generators.generate(arguments.generator or "natural_sgd", arguments.population,
                                    arguments.seed or 0)
    extra = dict(configuration.normalise_overrides(arguments.set))
    base = arguments.name or configuration.load(arguments.config, list(extra.items()))["algorithm"]
    members = [{"overrides": {**override, **extra}, "run_dir": None, "name": f"{base}-{index}"}
               for index, override in enumerate(overrides)]
    results = main_population(arguments.config, members, log_root=arguments.log_root,
                              group=arguments.group, device=arguments.device,
                              progress=not arguments.quiet)
    for result in results:
        loss = result["final"].get("Loss/Test", math.nan)
        print(f"{result['status']}: test loss {loss:.5g}, run directory: {result['run_dir']}")
    counts = {status: sum(r["status"] == status for r in results)
              for status in ("finished", "diverged")}
    print(f"population of {len(results)}: {counts['finished']} finished, "
          f"{counts['diverged']} diverged")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
