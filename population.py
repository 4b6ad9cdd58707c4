"""Populations: many runs of one configuration trained at once, as one
``torch.func.vmap`` over the pure step (:mod:`step`).

    python train.py -c DATA.yaml ALGORITHM.yaml --population N [--generator NAME] [--seed S]

Member k starts from the k-th draw of the generator (as ``parallel_exec.py``
draws it): its own hyperparameter values and seed, hence its own initial
weights and data order, and it gives what the same run gives alone. Members
may differ only in the weight optimiser's hyperparameter values and ``seed``:
one program (model, data, method, schedule) serves them all, their states
stacked along a leading dimension. Each member is seen as a single run
(:class:`Member`) and writes its own run directory exactly as ``train.py``
does, with :mod:`train`'s pieces: ``config.yaml``, TensorBoard logs,
checkpoints in the single-run format (a member resumes alone or re-packed),
``results.json``. A member whose training loss is not finite at a log
interval is frozen there by a mask; the others go on. What cannot vectorise
is refused in one line naming the key (:func:`refusal`).
"""
import contextlib
import functools
import json
import math
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import config as configuration
import datasets
import hyperparameters
import models
import processes
import train
from engine import (Sampled, Trainer, build_program, compile_by_calling, compiler, denormals_flushed,
                    initial_state, keep_freed_memory, shaped_batches)
from errors import UserError
from step import member as member_state
from step import stack, vectorised
from trees import tree_map

VARYING = ("seed",)  # plus network_weight's hyperparameter values


class Member:
    """One member of a population, seen as a single run (the interface of
    :class:`engine.Trainer` that logging, checkpoints and results use): its
    slice of the population's state (counters included), its own samplers."""

    def __init__(self, cfg, program, state, samplers, run_dir, index):
        self.config, self.program, self.state = cfg, program, state
        self.samplers, self.run_dir, self.index = samplers, Path(run_dir), index
        self.tracker, self.wall_time = None, 0.0

    validation_split = property(lambda self: self.program.validation_split)
    weights = property(lambda self: self.state["weights"])
    last_training_loss = property(lambda self: self.state["last_training_loss"])
    hyperparameter_step = Trainer.hyperparameter_step
    weight_step = Trainer.weight_step
    summary = Trainer.summary
    evaluate = Trainer.evaluate
    state_dict = Trainer.state_dict
    load_state_dict = Trainer.load_state_dict


# ------------------------------------------------------------------ what vectorises

def refusal(config, overrides=None):
    """None if this configuration can run as a vectorised population, else
    the one-line reason, naming the key. Decided from the configuration and
    the model it names, built on the meta device: no weights, no device, and
    the data read only for its sizes, once per dataset configuration."""
    cfg = train.prepare(configuration.load(config, configuration.normalise_overrides(overrides)))
    if "teaching" in cfg:  # populations of seeds, where the method's outer step is pure
        from commentaries import population as teaching_population
        return teaching_population.refusal(cfg)
    return model_refusal(model_structure(cfg), cfg)


_DATA_SIZES = {}  # dataset configuration -> the sizes a model takes from its data


def model_structure(cfg):
    """The configured model on the meta device, for what it is made of. A
    model takes only the data's ``input_shape`` and ``output_size``
    (:func:`models.build_model`); they are read from the data (a
    vocabulary's size needs its files), once per dataset configuration."""
    key = json.dumps([cfg["dataset"], cfg["validation_proportion"],
                      str(datasets.resolve_data_root(cfg["data_root"]))], sort_keys=True, default=str)
    if key not in _DATA_SIZES:
        data = datasets.load_data(cfg["dataset"], validation_proportion=cfg["validation_proportion"],
                                  data_root=cfg["data_root"], where=cfg.where("dataset"))
        _DATA_SIZES[key] = SimpleNamespace(input_shape=tuple(data.input_shape),
                                           output_size=int(data.output_size))
    with torch.device("meta"):
        return models.build_model(cfg["model"], _DATA_SIZES[key], where=cfg.where("model"))


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
    stripped = {key: value for key, value in cfg.items() if key not in VARYING}
    stripped["network_weight"] = {key: value for key, value in cfg["network_weight"].items()
                                  if key not in optimiser_names}
    return stripped


# ------------------------------------------------------------------ members

def build_members(config, members, log_root, group, device):
    """Resolved configurations, checks, the shared problem and program, and
    one :class:`Member` per entry (fresh, or resumed from its checkpoint).
    Returns ``(first configuration, program, members, device)``."""
    cfgs = [member_config(config, entry, device) for entry in members]
    first = cfgs[0]
    if "teaching" in first:
        raise UserError(refusal(config, members[0].get("overrides")))
    torch_device, dtype = train.device_and_dtype(first)
    torch.manual_seed(first["seed"])
    problem = train.load_problem(first, torch_device, dtype)
    reason = model_refusal(problem.model, first)
    if reason:
        raise UserError(reason)
    models.fold_for_population(problem.model)  # members share batches: see FoldedLinear
    program, _ = build_program(first, problem, torch_device, dtype)
    names = set(program.optimiser.hyperparameters)
    reference = strip_varying(first, names)
    built = []
    for index, (cfg, entry) in enumerate(zip(cfgs, members)):
        key = configuration.differing_key(reference, strip_varying(cfg, names))
        if key:
            raise UserError(f"{cfg.where(key)}: population members may differ only in "
                            f"{', '.join(sorted(names))} (network_weight) and seed")
        run_dir = entry.get("run_dir") or train.make_run_dir(
            log_root, group, entry.get("name") or cfg["algorithm"])
        built.append(build_member(cfg, problem, program, Path(run_dir), index))
    return first, program, built, torch_device


def member_config(config, entry, device):
    extra = configuration.normalise_overrides(entry.get("overrides"))
    if device is not None:
        extra.append(("device", device))
    return train.load_config(config, extra)


def build_member(cfg, problem, program, run_dir, index):
    """A member as its run alone starts (the same initial weights: seeded as
    :func:`train.main` seeds them), or resumed from its checkpoint."""
    device, dtype = train.device_and_dtype(cfg)
    _, initial = build_program(cfg, problem, device, dtype)
    torch.manual_seed(cfg["seed"])
    model = train.build_model(cfg, problem.data, device, dtype)
    weights = tuple(p.detach().clone() for p in model.parameters())
    state = initial_state(program, cfg, weights, {}, initial, device, dtype)
    samplers = Sampled(problem, cfg["batch_size"], cfg["seed"], device, program.validation_split)
    run_dir.mkdir(parents=True, exist_ok=True)
    train.write_config(run_dir, cfg)
    member = Member(cfg, program, state, samplers, run_dir, index)
    checkpoint = run_dir / train.CHECKPOINT
    resumed = checkpoint.is_file()
    if resumed:
        member.wall_time = train.load_state(checkpoint, member, cfg, restore_random=False)
    member.tracker = train.open_tracker(run_dir, cfg, member.weight_step if resumed else None)
    return member


def stacked_indices(members, draw):
    """Each member's indices from ``draw(member)``, stacked (None: whole split)."""
    indices = [draw(member) for member in members]
    return None if indices[0] is None else torch.stack(indices)


def batches(members, program, network_weight_steps):
    """One step's indices for every member, as :meth:`engine.Sampled.batches`, stacked."""
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


# ------------------------------------------------------------------ the loop

def run(cfg, program, members, device, progress):
    """Train ``members`` (all at the same step) as one vectorised population;
    returns each member's results, in order."""
    count = len(members)
    stepper = vectorised_program(cfg, program, device)
    state = stack([member.state for member in members])
    compile_time = train.compile_announced(
        cfg["compile"], progress, lambda: warm_up(stepper, state, members, program, cfg))
    evaluators = vectorised_evaluators(cfg, program)
    alive = torch.ones(count, dtype=torch.bool, device=device)
    live, results = list(range(count)), [None] * count
    schedule = train.Schedule(cfg, members[0].hyperparameter_step, members[0].weight_step)
    bar = train.progress_bar(f"{cfg['algorithm']} x{count}", schedule, progress)
    train.synchronise(device)
    started = time.perf_counter()
    elapsed = lambda: time.perf_counter() - started  # noqa: E731
    pending = []  # (tag, tensor over members, weight step), written at the interval's end

    def save():  # as train.run_loop's: the members' logs up to this step first, then their states
        write_scalars(pending, members, live)
        pending.clear()
        save_members(members, live, state, elapsed())

    while schedule.running and live:
        new_state, metrics = stepper.step(state, batches(members, program,
                                                         cfg["network_weight_steps"]))
        state = new_state if len(live) == count else freeze(alive, new_state, state)
        schedule.advance()
        pending.extend(train.hypergradient_scalars(metrics["hypergradients"],
                                                   schedule.weight_step))
        bar.update(1)
        if schedule.logs:
            pending.extend((tag, value, schedule.weight_step) for tag, value in
                           interval_scalars(cfg, program, evaluators, state, members).items())
            losses = flush(pending, members, live, program, state, schedule.weight_step)
            pending.clear()
            for index in [index for index in live if not math.isfinite(losses[index])]:
                live.remove(index)  # frozen from here on; the others go on
                alive[index] = False
                results[index] = finish_member(members[index], state, "diverged", elapsed(),
                                               compile_time, count)
        if schedule.checkpoints:
            train.synchronise(device)
            save()
        if live:  # after this step's logs
            train.stop_if_preempted(device, save, schedule.hyperparameter_step)
    train.synchronise(device)
    bar.close()
    final = final_metrics(evaluators, state, program.validation_split, live) if live else {}
    for index in live:
        results[index] = finish_member(members[index], state, "finished", elapsed(),
                                       compile_time, count, final[index])
    return results


def final_metrics(evaluators, state, validation_split, live):
    """``{member index: {tag: float}}``: the live members' final metrics
    (:func:`train.final_metric_tensors`) evaluated as one population and read
    back in one transfer, not one member after another (64 Fashion-MNIST-shape
    members: 4.4 s against 6.5 s on a CPU; on a GPU, one launch sequence for
    all members). The values equal a run alone's to rounding."""
    tensors = train.final_metric_tensors(
        lambda split: evaluators[split](state["weights"], state["buffers"], None), validation_split)
    values = torch.stack([value.to(torch.float64) for value in tensors.values()], dim=1)[live].tolist()
    return {index: dict(zip(tensors, row)) for index, row in zip(live, values)}


def vectorised_program(cfg, program, device):
    """The program whose step runs vmapped over members (and compiled, with ``compile: true``)."""
    if not cfg["compile"]:
        return program.wrapped(vectorised)
    compile_ = compiler(device)
    return program.wrapped(lambda function: compile_(vectorised(function)))


def warm_up(stepper, state, members, program, cfg):
    """Compile the vectorised step before the timed loop (pure: nothing changes)."""
    return compile_by_calling(stepper, state, shaped_batches(
        members[0].samplers, program, cfg["network_weight_steps"], state["weights"][0].device,
        members=len(members)))


def vectorised_evaluators(cfg, program):
    """``{split: evaluate(weights, buffers, indices)}`` and ``"summary":
    summary(raw)``, vmapped over members."""
    evaluators = {split: vectorised(functools.partial(_evaluate, program, split,
                                                      cfg["evaluation_batch_size"]))
                  for split in {"training", "test", program.validation_split}}
    evaluators["summary"] = vectorised(functools.partial(hyperparameters.summary,
                                                         transforms=program.transforms))
    return evaluators


def _evaluate(program, split, chunk_size, weights, buffers, indices):
    return program.evaluate(weights, buffers, split, chunk_size, indices)


def interval_scalars(cfg, program, evaluators, state, members):
    """``{tag: tensor over members}`` of a log interval, as :func:`train.log_metrics`
    queues them for one run (histograms: :func:`flush`)."""
    indices = (stacked_indices(members, lambda m: m.samplers.log.next())
               if cfg["validation_evaluation"] == "minibatch" else None)

    def evaluate(split, split_indices):
        return evaluators[split](state["weights"], state["buffers"], split_indices)

    raw = state["hyperparameters"]
    return {"Loss/Training": state["last_training_loss"],
            **train.interval_metrics(evaluate, cfg, program.validation_split, indices),
            **train.hyperparameter_scalars(raw, evaluators["summary"](raw))}


def flush(pending, members, live, program, state, step):
    """Write the buffered values of the live members, and their histograms,
    to their own TensorBoard logs; returns each member's latest training
    loss (NaN for members no longer live)."""
    for index in live:
        train.log_histograms(members[index].tracker, member_state(state["hyperparameters"], index),
                             program.transforms, step)
    values = write_scalars(pending, members, live)
    training = next(row for (tag, _, _), row in zip(reversed(pending), reversed(values))
                    if tag == "Loss/Training")
    return [training[index] if index in live else math.nan for index in range(len(members))]


def write_scalars(pending, members, live):
    """Write the buffered ``(tag, tensor over members, step)`` of the live
    members (and what their trackers hold) to their own TensorBoard logs
    with one host transfer; returns the values, one row per entry."""
    values = torch.stack([value.to(torch.float64).reshape(len(members))
                          for _, value, _ in pending]).cpu().tolist() if pending else []
    for index in live:
        member = members[index]
        for (tag, _, at), row in zip(pending, values):
            member.tracker.scalar(tag, row[index], at)
        member.tracker.flush()
    return values


def save_members(members, live, state, elapsed):
    """Each live member's checkpoint in its own run directory, in the single-run format."""
    for index in live:
        member = members[index]
        member.state = member_state(state, index)
        train.save_state(member.run_dir / train.CHECKPOINT, member, member.config,
                         member.wall_time + elapsed)


def finish_member(member, state, status, elapsed, compile_time, population_size, final=None):
    """Results of one member as a single run's: final metrics (``final``, or
    evaluated for this member), ``Final/*`` logs, ``results.json``; its
    checkpoint has done its job."""
    member.state = member_state(state, member.index)
    results = train.finish(member, member.config, member.tracker,
                           (status, member.wall_time + elapsed), member.run_dir, None, final)
    results.update(compile_time_s=compile_time, host=socket.gethostname(),
                   population_size=population_size)
    train.write_json(member.run_dir / train.RESULTS, results)
    (member.run_dir / train.CHECKPOINT).unlink(missing_ok=True)
    return results


# ------------------------------------------------------------------ entry points

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


def main(config, members, *, log_root="runs", group=None, device=None, progress=True):
    """Train ``members`` as one vectorised population; returns each member's
    results (as :func:`train.main` returns, with ``run_dir``), in order.

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
    if is_teaching(config, members[0]):
        from commentaries import population as teaching_population
        return teaching_population.main(config, members, log_root=log_root, group=group,
                                        device=device, progress=progress)
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
        locks.enter_context(denormals_flushed(cfg["flush_denormal"]))
        for step in sorted({member.hyperparameter_step for member in built}):
            alike = [member for member in built if member.hyperparameter_step == step]
            for index, member in enumerate(alike):
                member.index = index
            for member, result in zip(alike, run(cfg, program, alike, torch_device, progress)):
                results[pending[built.index(member)]] = result
    return results


def lock_member_directory(run_dir, locks):
    """Lock a member's run directory (held in ``locks`` until the population
    ends), as :func:`train.main` locks a run's; returns the results already
    there if another process finished it while we waited, else None."""
    if run_dir is None:
        return None  # a fresh, unique directory: nobody else can be in it
    run_dir = Path(run_dir)
    train.make_directory(run_dir, f"run_dir {run_dir}")
    if locks.enter_context(processes.run_directory_lock(run_dir)):
        done = train.finished_results(run_dir)
        if done is not None:
            return done
    train.clear_failed_attempt(run_dir)
    return None


def is_teaching(config, entry):
    return "teaching" in configuration.load(config, configuration.normalise_overrides(
        entry.get("overrides")))


def cli(arguments):
    """``train.py --population N`` (its parsed arguments): N members from the
    generator, trained as one population."""
    import generators
    if arguments.population < 1:
        raise UserError(f"--population: must be an integer >= 1, got {arguments.population}")
    for flag, value in (("--run-dir", arguments.run_dir), ("-S/--save", arguments.save),
                        ("-s/--load", arguments.load)):
        if value is not None:
            raise UserError(f"{flag}: not with --population (each member writes, checkpoints "
                            f"and resumes in its own run directory)")
    extra = dict(configuration.normalise_overrides(arguments.set))
    default = "iteration_id" if is_teaching(arguments.config, {"overrides": extra}) else "natural_sgd"
    overrides = generators.generate(arguments.generator or default, arguments.population,
                                    arguments.seed or 0)  # teaching: seeds S, S+1, ...
    base = arguments.name or configuration.load(arguments.config, list(extra.items()))["algorithm"]
    members = [{"overrides": {**override, **extra}, "run_dir": None, "name": f"{base}-{index}"}
               for index, override in enumerate(overrides)]
    results = main(arguments.config, members, log_root=arguments.log_root, group=arguments.group,
                   device=arguments.device, progress=not arguments.quiet)
    for result in results:
        loss = result["final"].get("Loss/Test", math.nan)
        print(f"{result['status']}: test loss {loss:.5g}, run directory: {result['run_dir']}")
    counts = {status: sum(r["status"] == status for r in results)
              for status in ("finished", "diverged")}
    print(f"population of {len(results)}: {counts['finished']} finished, "
          f"{counts['diverged']} diverged")
    return 0
