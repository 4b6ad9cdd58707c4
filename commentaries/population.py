"""Populations of teaching runs over seeds.

    python train.py -c DATA.yaml METHOD.yaml --population N [--seed S]

A method whose outer step is a pure function of its state
(:class:`loop.PureTeachingMethod`: ExampleWeighting, GTN) trains N seeds at
once. Every member is built, set up, resumed, logged, checkpointed and
finished exactly as its run alone (:class:`loop.Run`: its own run
directory, ``config.yaml``, TensorBoard logs, checkpoints, teacher file and
``results.json``), with its own global random stream; only the outer steps
are shared: one ``torch.func.vmap`` of the method's ``pure_outer_step``
over the members' stacked states (teacher, outer-optimiser state) and
draws (a fresh student, its batches, from each member's generator). Other
methods are refused in one line naming the key.
"""
import contextlib
import socket
import time
from pathlib import Path

import torch

import config as configuration
import processes
import validate
from engine import compiler, compiler_failures, denormals_flushed
from errors import UserError
from step import member, stack
from train import (CHECKPOINT, RESULTS, clear_failed_attempt, compile_announced, finished_results,
                   make_directory, make_run_dir, pick_device, prepare, random_states,
                   restore_random_states, stop_if_preempted, write_config, write_json)

import commentaries
from commentaries import TEACHERS, loop

VARYING = ("seed",)  # what may differ between the members of a teaching population


def refusal(cfg):
    """None if the ``teaching`` configuration ``cfg`` can run as a population
    of seeds, else the one-line reason, naming its file and key."""
    options = cfg["teaching"]
    if not isinstance(options, dict):
        return f"{cfg.where('teaching')}: must be a mapping with a class"
    try:
        method = TEACHERS.get(options.get("class"), cfg.where("teaching.class"))
    except UserError as error:
        return str(error)
    reason = method.population_refusal(dict(options))
    return None if reason is None else configuration.locate(cfg, reason)


def configurations(config, members, device):
    """Each member's resolved, checked configuration; members may differ in seed alone."""
    cfgs = []
    for entry in members:
        extra = configuration.normalise_overrides(entry.get("overrides"))
        if device is not None:
            extra.append(("device", device))
        cfg = prepare(configuration.load(config, extra))
        validate.check(cfg)
        cfgs.append(cfg)
    reason = refusal(cfgs[0])
    if reason:
        raise UserError(reason)
    reference = {key: value for key, value in cfgs[0].items() if key not in VARYING}
    for cfg in cfgs[1:]:
        key = configuration.differing_key(reference, {key: value for key, value in cfg.items() if key not in VARYING})
        if key:
            raise UserError(f"{cfg.where(key)}: members of a teaching population may differ only in "
                            f"{', '.join(VARYING)}")
    return cfgs


@contextlib.contextmanager
def own_stream(streams, index):
    """Member ``index``'s global random stream, as if it ran alone."""
    restore_random_states(streams[index])
    try:
        yield
    finally:
        streams[index] = random_states()


def same_data(methods, cfg):
    """A population shares member 0's data in its vectorised step: the data must not depend on the seed."""
    splits = ("training", "validation", "test")
    first = getattr(methods[0], "data", None)
    if first is None:  # a method without a data set (TeachingMethod.use_data)
        return
    for method in methods[1:]:
        for split in splits:
            for kind in ("inputs", "targets"):
                a, b = (getattr(data, f"{split}_{kind}") for data in (first, method.data))
                if a.shape != b.shape or not torch.equal(a, b):
                    raise UserError(f"{cfg.where('teaching.data')}: the data set depends on the seed; "
                                    f"the members of a population must share one")


def train_together(runs, streams):
    """Outer steps of runs at the same step, as one vmap of member 0's pure
    step (``compile: true``: compiled, before the members' timed loops)."""
    methods = [run.method for run in runs]
    vectorised = torch.func.vmap(methods[0].pure_outer_step, randomness="error")
    if runs[0].context.compile:
        vectorised = compiler(runs[0].context.device)(vectorised)
        warm_up(runs, streams, vectorised)

    def draws(step):
        inputs = []
        for index, method in enumerate(methods):
            with own_stream(streams, index):
                inputs.append(method.outer_inputs(step))
        return stack(inputs)

    while any(run.running for run in runs):
        states, metrics = vectorised(stack([method.outer_state() for method in methods]), draws(runs[0].step))
        for index, run in enumerate(runs):
            if run.running:  # a diverged member's slice is computed and ignored
                run.method.load_outer_state(member(states, index))
                with own_stream(streams, index):
                    run.record(member(metrics, index))
        stop_members_if_preempted(runs, streams)


def stop_members_if_preempted(runs, streams):
    """If SLURM is preempting the job: every running member saves its state
    (in its own random stream, as its periodic checkpoints do), then stop."""
    running = [index for index, run in enumerate(runs) if run.running]

    def save():
        for index in running:
            with own_stream(streams, index):
                runs[index].save()

    if running:
        stop_if_preempted(runs[running[0]].context.device, save, runs[running[0]].step,
                          unit="outer step")


def warm_up(runs, streams, vectorised):
    """Compile ``vectorised`` by one call on the members' states and draws,
    every member's state, generators and global stream restored after it;
    each member records the compile time as its own."""
    snapshots, saved_streams = [run.method.state_dict() for run in runs], list(streams)

    def compiling():
        started = time.perf_counter()
        try:
            inputs = []
            for index, run in enumerate(runs):
                with own_stream(streams, index):
                    inputs.append(run.method.outer_inputs(run.step))
            with compiler_failures():
                vectorised(stack([run.method.outer_state() for run in runs]), stack(inputs))
        finally:
            for run, snapshot in zip(runs, snapshots):
                run.method.load_state_dict(snapshot)
            streams[:] = saved_streams
        return time.perf_counter() - started
    elapsed = compile_announced(True, runs[0].context.progress, compiling)
    now = time.perf_counter()
    for run in runs:
        run.compile_time, run.started = elapsed, now


def main(config, members, *, log_root="runs", group=None, device=None, progress=True):
    """Train the teaching ``members`` (``[{"overrides", "run_dir", "name"}]``,
    differing in seed alone) as one population; returns each member's results
    as ``train.main`` returns them, in order. A member whose run directory
    holds a checkpoint resumes from it (members at different steps step as
    separate populations); one already finished there is returned as it is."""
    if not members:
        return []
    cfgs = configurations(config, members, device)
    results = [None] * len(members)
    with contextlib.ExitStack() as locks:
        runs, streams, pending = [], [], []
        for index, (cfg, entry) in enumerate(zip(cfgs, members)):
            run_dir = Path(entry.get("run_dir") or make_run_dir(log_root, group, entry.get("name")
                                                                or cfg["algorithm"]))
            make_directory(run_dir, f"run_dir {run_dir}")
            if locks.enter_context(processes.run_directory_lock(run_dir)):
                done = finished_results(run_dir)  # another process finished it while we waited
                if done is not None:
                    results[index] = done
                    continue
            clear_failed_attempt(run_dir)  # an attempt killed before its first checkpoint
            write_config(run_dir, cfg)
            torch.manual_seed(cfg["seed"])  # as train.main
            context = loop.Context.from_config(cfg, run_dir, pick_device(cfg["device"], cfg.where("device")),
                                               progress and not runs)
            try:
                method = commentaries.build(cfg["teaching"], context, where=cfg.where("teaching"))
                with loop.default_dtype(context.dtype):
                    runs.append(loop.Run(method, context))
            except UserError as error:  # deep checks know the key; name its file too
                raise UserError(configuration.locate(cfg, str(error))) from None
            streams.append(random_states())
            pending.append(index)
        if not runs:
            return results
        same_data([run.method for run in runs], cfgs[pending[0]])
        locks.enter_context(loop.default_dtype(runs[0].context.dtype))
        locks.enter_context(denormals_flushed(cfgs[pending[0]]["flush_denormal"]))
        for start in sorted({run.step for run in runs}):
            together = [i for i, run in enumerate(runs) if run.step == start]
            sub_streams = [streams[i] for i in together]
            train_together([runs[i] for i in together], sub_streams)
            for i, state in zip(together, sub_streams):
                streams[i] = state
        for i, (index, run) in enumerate(zip(pending, runs)):
            with own_stream(streams, i):
                result = run.finish()
            cfg = cfgs[index]
            result.update(algorithm=cfg["algorithm"], seed=cfg["seed"], run_dir=str(run.context.run_dir))
            result["host"] = socket.gethostname()
            write_json(Path(run.context.run_dir) / RESULTS, result)
            (Path(run.context.run_dir) / CHECKPOINT).unlink(missing_ok=True)
            results[index] = result
    return results
