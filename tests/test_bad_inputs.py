"""A battery of bad inputs across train.py, parallel_exec.py, bayesopt.py and report.py.

Each case must end in exit status 2 with exactly one line on stderr that
starts with ``error:``, carries no traceback, and names where the bad value is
(the file, ``--set`` or the flag) and the key. Hostile pickles must run
nothing: their marker file is never created.

The commands are called in-process (``train.cli``, ``parallel_exec.main``, ...)
with stderr captured. Run as a script (``python tests/test_bad_inputs.py``) it
classifies every case instead of asserting, which is how the before/after
figures in the report were counted.
"""
import contextlib
import io
import json
import os
import pickle
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "configs"
DIGITS = str(CONFIGS / "digits.yaml")
RANDOM = str(CONFIGS / "Random.yaml")
OURS = str(CONFIGS / "Ours_LR.yaml")
BAYESOPT = str(CONFIGS / "Random_Validation_BayesOpt.yaml")
WITH_COMMENTARY = str(CONFIGS / "Commentary_TrainWithCommentary.yaml")


class Hostile:
    """Unpickling this object creates the file ``marker``: foreign code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Case:
    command: str  # train, parallel_exec, bayesopt, report
    build: object  # tmp_path -> argv
    expected: list  # fragments the one line must contain ("{tmp}" is replaced)
    marker: bool = False  # a hostile pickle: tmp/marker must not exist afterwards


def write(tmp, name, text):
    path = Path(tmp) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def tiny(tmp):
    return write(tmp, "tiny.yaml", "hyperparameter_steps: 2\nnetwork_weight_steps: 2\nbatch_size: 32\n")


def train_args(tmp, *extra, algorithm=RANDOM, files=()):
    return ["-c", DIGITS, algorithm, tiny(tmp), *files, "-q", "-l", str(Path(tmp) / "runs"), *extra]


def fanout_args(tmp, *extra):
    return ["-c", DIGITS, "--algorithms", "Random", "--repetitions", "1", "--workers", "1",
            "-l", str(Path(tmp) / "runs"), "--no-progress", *extra,
            "--set", "hyperparameter_steps=2", "network_weight_steps=2"]


def bayesopt_args(tmp, *extra):
    return ["-c", DIGITS, BAYESOPT, "--trials", "1", "--initial", "1", "--workers", "1",
            "-l", str(Path(tmp) / "runs"), "--no-progress", *extra,
            "--set", "hyperparameter_steps=2", "network_weight_steps=2"]


def hostile_torch_file(tmp, name):
    import torch

    path = Path(tmp) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trainer": Hostile(Path(tmp) / "marker")}, path)
    return str(path)


def hostile_raw_pickle(tmp, name):
    path = Path(tmp) / name
    path.write_bytes(pickle.dumps(Hostile(Path(tmp) / "marker")))
    return str(path)


def saved_state(tmp, *overrides, name="state.pt", algorithm=RANDOM):
    """A real saved state of a tiny run on digits (``-S``)."""
    import train

    path = Path(tmp) / name
    with contextlib.redirect_stdout(io.StringIO()):
        code = train.cli(train_args(tmp, "-S", str(path), "--set", *(overrides or ["seed=0"]),
                                    algorithm=algorithm))
    assert code == 0 and path.is_file()
    return path


def corrupt(path):
    data = bytearray(path.read_bytes())
    position = len(data) // 2
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def run_dir_with_checkpoint(tmp, content):
    run_dir = Path(tmp) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    if callable(content):
        content(run_dir / "checkpoint.pt")
    else:
        (run_dir / "checkpoint.pt").write_bytes(content)
    return str(run_dir)


def other_size_checkpoint(tmp):
    """A checkpoint of a run with hidden width 20 placed where a width-50 run resumes."""
    state = saved_state(tmp, "model.layer_sizes=[64,20,10]")
    run_dir = Path(tmp) / "run"
    run_dir.mkdir()
    os.replace(state, run_dir / "checkpoint.pt")
    return str(run_dir)


def other_steps_checkpoint(tmp, override):
    state = saved_state(tmp, override)
    run_dir = Path(tmp) / "run"
    run_dir.mkdir()
    os.replace(state, run_dir / "checkpoint.pt")
    return str(run_dir)


def results_tree(tmp, results=None, best=None, raw=None):
    root = Path(tmp) / "runs"
    run = root / "digits" / "Random" / "rep_0"
    run.mkdir(parents=True)
    good = {"status": "finished", "algorithm": "Random", "dataset": "Digits", "wall_time_s": 1.0,
            "final": {"Loss/Test": 0.5}}
    if raw is not None:
        (run / "results.json").write_bytes(raw)
    else:
        (run / "results.json").write_text(json.dumps({**good, **(results or {})}))
    if best is not None:
        campaign = root / "bo" / "digits" / "Random_Validation_BayesOpt"
        campaign.mkdir(parents=True)
        (campaign / "best.json").write_text(json.dumps(best))
    return root


def commentary_args(tmp, path):
    return ["-c", WITH_COMMENTARY, "-q", "-l", str(Path(tmp) / "runs"),
            "--set", f"teaching.commentary={path}", "teaching.steps=2"]


def from_directory_args(tmp, text):
    folder = Path(tmp) / "inits"
    write(folder, "iteration_0.yaml", text)
    return ["-c", DIGITS, "--algorithms", "Random", "--generator", f"from_directory:{folder}",
            "--workers", "1", "-l", str(Path(tmp) / "runs"), "--no-progress",
            "--set", "hyperparameter_steps=2"]


def campaign_args(tmp, text):
    path = write(tmp, "campaign.yaml", text)
    return ["--campaign", path, "-l", str(Path(tmp) / "runs"), "--no-progress", "--workers", "1",
            "--repetitions", "1", "--set", "hyperparameter_steps=2"]


def campaign_with_config(tmp, text):
    return campaign_args(tmp, f"config: [{DIGITS}]\nalgorithms: [Random]\n{text}")


def search_args(tmp, text):
    return bayesopt_args(tmp, "--search", write(tmp, "search.yaml", text))


def corrupt_ax_state(tmp):
    directory = Path(tmp) / "runs" / "bayesopt" / "digits" / "Random_Validation_BayesOpt"
    directory.mkdir(parents=True)
    (directory / "ax_client.json").write_text('{"experiment": {"name": ')
    return bayesopt_args(tmp)


def a_file(tmp, name="file"):
    return write(tmp, name, "not a directory\n")


def _without(arguments, flag):
    """``arguments`` with ``flag`` and its value removed."""
    result, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
            continue
        if argument == flag:
            skip = True
            continue
        result.append(argument)
    return result


BINARY = bytes(range(256)) * 4
LATIN1 = "model: {class: MLP}\n# caf\xe9\n".encode("latin-1")

CASES = {
    # ------------------------------------------------------------------ train.py: keys in the wrong place
    "train-nested-typo-in-model-blames-my-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "model: {layer_size: [64, 10]}\n")]),
        ["my.yaml", "layer_size"]),
    "train-nested-typo-in-network-weight-blames-my-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "network_weight: {lrr: -2}\n")]),
        ["my.yaml", "network_weight.lrr"]),
    "train-nested-typo-in-hypergradient-blames-my-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "hypergradient: {windo: 3}\n")]),
        ["my.yaml", "hypergradient.windo"]),
    "train-nested-typo-in-dataset-blames-my-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "dataset: {normalise: true}\n")]),
        ["my.yaml", "dataset.normalise"]),
    "train-nested-typo-in-outer-optimiser-blames-my-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "hyperparameter: {betas2: 1}\n")],
                                      algorithm=OURS),
        ["my.yaml", "hyperparameter.betas2"]),
    "train-set-model-foo": Case("train", lambda t: train_args(t, "--set", "model.foo=1"),
                                ["--set", "model.foo"]),
    "train-set-loss-typo": Case("train", lambda t: train_args(t, "--set", "loss.reduce=sum"),
                                ["--set", "loss.reduce"]),
    "train-set-flush-denormal-not-a-bool": Case(
        "train", lambda t: train_args(t, "--set", "flush_denormal=maybe"),
        ["--set", "flush_denormal", "true or false", "maybe"]),
    "train-flush-denormal-not-a-bool-in-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "flush_denormal: 0\n")]),
        ["my.yaml", "flush_denormal", "true or false"]),
    "train-set-unknown-solver": Case(
        "train", lambda t: train_args(t, "--set", "hypergradient.solver=gmres", algorithm=OURS),
        ["--set", "hypergradient.solver", "gmres"]),
    "train-unknown-solver-in-file": Case(
        "train", lambda t: train_args(t, algorithm=OURS, files=[
            write(t, "my.yaml", "hypergradient: {solver: gmres}\n")]),
        ["my.yaml", "hypergradient.solver", "gmres"]),
    "train-unknown-model-class-in-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "model: {class: MLQ}\n")]),
        ["my.yaml", "model.class", "MLQ"]),
    # ------------------------------------------------------------------ train.py: values that crash deep inside
    "train-negative-layer-width": Case(
        "train", lambda t: train_args(t, "--set", "model.layer_sizes=[64,-5,10]"),
        ["--set", "model.layer_sizes"]),
    "train-zero-layer-width": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "model: {layer_sizes: [64, 0, 10]}\n")]),
        ["my.yaml", "model.layer_sizes"]),
    "train-layer-sizes-not-a-list": Case(
        "train", lambda t: train_args(t, "--set", "model.layer_sizes=five"), ["--set", "model.layer_sizes"]),
    "train-seed-2-70-set": Case("train", lambda t: train_args(t, "--set", f"seed={2 ** 70}"),
                                ["--set", "seed"]),
    "train-seed-2-70-flag": Case("train", lambda t: train_args(t, "--seed", str(2 ** 70)), ["--seed"]),
    "train-seed-2-70-file": Case("train", lambda t: train_args(t, files=[write(t, "my.yaml", f"seed: {2 ** 70}\n")]),
                                 ["my.yaml", "seed"]),
    "train-config-dicts-5": Case("train", lambda t: train_args(t, files=[write(t, "my.yaml", "config_dicts: 5\n")]),
                                 ["my.yaml", "config_dicts"]),
    "train-device-mps-flag": Case("train", lambda t: train_args(t, "-d", "mps"), ["--device", "mps"]),
    "train-device-meta-set": Case("train", lambda t: train_args(t, "--set", "device=meta"),
                                  ["--set", "device", "meta"]),
    "train-device-garbage-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "device: gpu7\n")]), ["my.yaml", "device"]),
    "train-device-cuda-index-garbage": Case("train", lambda t: train_args(t, "-d", "cuda:x"), ["--device"]),
    "train-device-not-a-string": Case("train", lambda t: train_args(t, "--set", "device=5"),
                                      ["--set", "device"]),
    # ------------------------------------------------------------------ train.py: hyperparameter values
    "train-lr-nan": Case("train", lambda t: train_args(t, "--set", "network_weight.lr=.nan"),
                         ["--set", "network_weight.lr"]),
    "train-lr-inf": Case("train", lambda t: train_args(t, "--set", "network_weight.lr=.inf"),
                         ["--set", "network_weight.lr"]),
    "train-lr-1e308": Case("train", lambda t: train_args(t, "--set", "network_weight.lr=1e308"),
                           ["--set", "network_weight.lr"]),
    "train-weight-decay-1e308-in-file": Case(
        "train", lambda t: train_args(t, files=[write(t, "my.yaml", "network_weight: {weight_decay: 1.0e+308}\n")]),
        ["my.yaml", "network_weight.weight_decay"]),
    "train-momentum-minus-inf": Case("train", lambda t: train_args(t, "--set", "network_weight.momentum=-.inf"),
                                     ["--set", "network_weight.momentum"]),
    "train-lr-a-string": Case("train", lambda t: train_args(t, "--set", "network_weight.lr=fast"),
                              ["--set", "network_weight.lr"]),
    "train-negative-outer-lr": Case("train", lambda t: train_args(t, "--set", "hyperparameter.lr=-0.05",
                                                                  algorithm=OURS),
                                    ["--set", "hyperparameter.lr"]),
    "train-nan-outer-lr": Case("train", lambda t: train_args(t, "--set", "hyperparameter.lr=.nan", algorithm=OURS),
                               ["--set", "hyperparameter.lr"]),
    "train-lr-multiplier-inf": Case("train", lambda t: train_args(t, "--set", "network_weight.lr_multiplier=.inf"),
                                    ["--set", "network_weight.lr_multiplier"]),
    "train-clipping-nan": Case("train", lambda t: train_args(t, "--set", "hyperparameter_clipping.lr=[.nan,0]"),
                               ["--set", "hyperparameter_clipping.lr"]),
    "train-validation-proportion-1-5": Case("train", lambda t: train_args(t, "--set", "validation_proportion=1.5"),
                                            ["--set", "validation_proportion"]),
    "train-batch-size-zero-in-file": Case("train", lambda t: train_args(t, files=[write(t, "my.yaml", "batch_size: 0\n")]),
                                          ["my.yaml", "batch_size"]),
    "train-optimised-a-string": Case("train", lambda t: train_args(t, "--set", "optimised_hyperparameters=lr"),
                                     ["--set", "optimised_hyperparameters"]),
    "train-dtype-float16": Case("train", lambda t: train_args(t, "--set", "dtype=float16"), ["--set", "dtype"]),
    # ------------------------------------------------------------------ train.py: files that are not what they seem
    "train-binary-config": Case("train", lambda t: train_args(t, files=[write(t, "my.yaml", BINARY)]),
                                ["my.yaml"]),
    "train-latin1-config": Case("train", lambda t: train_args(t, files=[write(t, "my.yaml", LATIN1)]),
                                ["my.yaml", "UTF-8"]),
    "train-config-is-a-directory": Case("train", lambda t: train_args(t, files=[str(Path(t))]),
                                        [str("{tmp}"), "directory"]),
    "train-empty-config": Case("train", lambda t: ["-c", write(t, "empty.yaml", ""), "-q"], ["empty.yaml"]),
    "train-only-comments-config": Case("train", lambda t: train_args(t, files=[write(t, "my.yaml", "# nothing\n")]),
                                       ["my.yaml"]),
    "train-load-yaml-file": Case("train", lambda t: train_args(t, "-s", tiny(t)), ["-s", "tiny.yaml"]),
    "train-load-garbage": Case("train", lambda t: train_args(t, "-s", write(t, "state.pt", BINARY)),
                               ["-s", "state.pt"]),
    "train-load-hostile-torch-file": Case(
        "train", lambda t: train_args(t, "-s", hostile_torch_file(t, "state.pt")), ["-s", "state.pt"],
        marker=True),
    "train-load-hostile-raw-pickle": Case(
        "train", lambda t: train_args(t, "-s", hostile_raw_pickle(t, "state.pt")), ["-s", "state.pt"],
        marker=True),
    "train-load-corrupted-state": Case(
        "train", lambda t: train_args(t, "-s", str(corrupt(saved_state(t)))), ["-s", "state.pt"]),
    "train-load-directory": Case("train", lambda t: train_args(t, "-s", str(t)), ["-s"]),
    "train-run-dir-truncated-checkpoint": Case(
        "train", lambda t: train_args(t, "--run-dir", run_dir_with_checkpoint(
            t, lambda p: p.write_bytes(saved_state(t).read_bytes()[:3000]))),
        ["checkpoint.pt"]),
    "train-run-dir-random-checkpoint": Case(
        "train", lambda t: train_args(t, "--run-dir", run_dir_with_checkpoint(t, os.urandom(5000))),
        ["checkpoint.pt"]),
    "train-run-dir-hostile-checkpoint": Case(
        "train", lambda t: train_args(t, "--run-dir", run_dir_with_checkpoint(
            t, lambda p: hostile_torch_file(t, "run/checkpoint.pt"))),
        ["checkpoint.pt"], marker=True),
    "train-run-dir-corrupted-checkpoint": Case(
        "train", lambda t: train_args(t, "--run-dir", run_dir_with_checkpoint(
            t, lambda p: p.write_bytes(corrupt(saved_state(t)).read_bytes()))),
        ["checkpoint.pt"]),
    "train-run-dir-checkpoint-of-other-model-size": Case(
        "train", lambda t: train_args(t, "--run-dir", other_size_checkpoint(t)), ["checkpoint.pt", "model"]),
    "train-run-dir-checkpoint-of-other-network-weight-steps": Case(
        "train", lambda t: train_args(t, "--run-dir", other_steps_checkpoint(t, "network_weight_steps=3")),
        ["checkpoint.pt", "network_weight_steps"]),
    "train-load-state-of-other-optimised-hyperparameters": Case(
        "train", lambda t: train_args(t, "-s", str(saved_state(t, "optimised_hyperparameters=[lr]", algorithm=OURS)),
                                      algorithm=OURS),
        ["-s", "state.pt", "optimised_hyperparameters"]),
    "train-run-dir-is-a-file": Case("train", lambda t: train_args(t, "--run-dir", a_file(t)), ["--run-dir", "file"]),
    "train-log-root-is-a-file": Case("train", lambda t: train_args(t, "-l", a_file(t)), ["-l", "file"]),
    "train-save-into-missing-directory": Case(
        "train", lambda t: train_args(t, "-S", str(Path(t) / "missing" / "s.pt")), ["-S", "missing"]),
    "train-hostile-commentary": Case(
        "train", lambda t: commentary_args(t, hostile_torch_file(t, "commentary.pt")),
        ["--set", "teaching.commentary"], marker=True),
    "train-garbage-commentary": Case(
        "train", lambda t: commentary_args(t, write(t, "commentary.pt", BINARY)),
        ["--set", "teaching.commentary"]),
    # ------------------------------------------------------------------ train.py: the command line
    "train-unknown-flag": Case("train", lambda t: train_args(t, "--bogus"), ["--bogus"]),
    "train-seed-not-an-integer": Case("train", lambda t: train_args(t, "--seed", "abc"), ["--seed"]),
    "train-no-config": Case("train", lambda t: ["-q"], ["-c"]),
    "train-set-not-key-value": Case("train", lambda t: train_args(t, "--set", "batch_size"), ["--set", "batch_size"]),
    "train-set-bad-yaml": Case("train", lambda t: train_args(t, "--set", "model.layer_sizes=[1,"),
                               ["--set", "model.layer_sizes"]),
    # ------------------------------------------------------------------ parallel_exec.py
    "fanout-workers-0": Case("parallel_exec", lambda t: fanout_args(t, "--workers", "0"), ["--workers"]),
    "fanout-workers-negative": Case("parallel_exec", lambda t: fanout_args(t, "--workers", "-3"), ["--workers"]),
    "fanout-repetitions-0": Case("parallel_exec", lambda t: fanout_args(t, "--repetitions", "0"), ["--repetitions"]),
    "fanout-unknown-algorithm": Case("parallel_exec", lambda t: fanout_args(t, "--algorithms", "Nope"),
                                     ["--algorithms", "Nope"]),
    "fanout-set-model-foo": Case("parallel_exec", lambda t: fanout_args(t, "--set", "model.foo=1"),
                                 ["--set", "model.foo"]),
    "fanout-set-negative-layer-width": Case(
        "parallel_exec", lambda t: fanout_args(t, "--set", "model.layer_sizes=[64,-1,10]"),
        ["--set", "model.layer_sizes"]),
    "fanout-set-lr-nan": Case("parallel_exec", lambda t: fanout_args(t, "--set", "network_weight.lr=.nan"),
                              ["--set", "network_weight.lr"]),
    "fanout-unknown-generator": Case("parallel_exec", lambda t: fanout_args(t, "--generator", "bogus"),
                                     ["--generator", "bogus"]),
    "fanout-generator-bad-range": Case(
        "parallel_exec", lambda t: campaign_with_config(t, "generator: {class: natural_sgd, lr: five}\n"),
        ["campaign.yaml", "generator"]),
    "fanout-missing-config": Case("parallel_exec", lambda t: ["-c", str(Path(t) / "nope.yaml"),
                                                              *fanout_args(t)[2:]], ["nope.yaml"]),
    "fanout-binary-config": Case("parallel_exec", lambda t: ["-c", write(t, "my.yaml", BINARY),
                                                             *fanout_args(t)[2:]], ["my.yaml"]),
    "fanout-log-root-is-a-file": Case("parallel_exec", lambda t: fanout_args(t, "-l", a_file(t)), ["-l", "file"]),
    "fanout-unknown-flag": Case("parallel_exec", lambda t: fanout_args(t, "--bogus"), ["--bogus"]),
    "fanout-unknown-executor": Case("parallel_exec", lambda t: fanout_args(t, "--executor", "pbs"),
                                    ["--executor", "pbs"]),
    "fanout-override-file-nested-typo": Case(
        "parallel_exec", lambda t: from_directory_args(t, "model: {layer_size: [64, 10]}\n"),
        ["iteration_0.yaml", "layer_size"]),
    "fanout-override-file-unknown-key": Case(
        "parallel_exec", lambda t: from_directory_args(t, "hyperparameter_step: 3\n"),
        ["iteration_0.yaml", "hyperparameter_step"]),
    "fanout-override-file-binary": Case(
        "parallel_exec", lambda t: from_directory_args(t, BINARY), ["iteration_0.yaml"]),
    "campaign-workers-two": Case("parallel_exec", lambda t: _without(campaign_with_config(t, "workers: two\n"), "--workers"),
                                 ["campaign.yaml", "workers"]),
    "campaign-workers-zero": Case("parallel_exec", lambda t: _without(campaign_with_config(t, "workers: 0\n"), "--workers"),
                                  ["campaign.yaml", "workers"]),
    "campaign-config-5": Case("parallel_exec", lambda t: campaign_args(t, "config: 5\nalgorithms: [Random]\n"),
                              ["campaign.yaml", "config"]),
    "campaign-set-list-of-numbers": Case("parallel_exec", lambda t: _without(campaign_with_config(
        t, "set: [1, 2]\n"), "--set"),
                                         ["campaign.yaml", "set"]),
    "campaign-set-nested-typo": Case("parallel_exec", lambda t: _without(campaign_with_config(
        t, "set: {model.foo: 1, hyperparameter_steps: 2}\n"), "--set"),
                                     ["campaign.yaml", "model.foo"]),
    "campaign-algorithms-number": Case("parallel_exec", lambda t: campaign_args(t, f"config: [{DIGITS}]\nalgorithms: 5\n"),
                                       ["campaign.yaml", "algorithms"]),
    "campaign-repetitions-string": Case(
        "parallel_exec", lambda t: _without(campaign_with_config(t, "repetitions: many\n"), "--repetitions"),
        ["campaign.yaml", "repetitions"]),
    "campaign-seed-float": Case("parallel_exec", lambda t: campaign_with_config(t, "seed: 1.5\n"),
                                ["campaign.yaml", "seed"]),
    "campaign-unknown-key": Case("parallel_exec", lambda t: campaign_with_config(t, "wokers: 2\n"),
                                 ["campaign.yaml", "wokers"]),
    "campaign-binary": Case("parallel_exec", lambda t: ["--campaign", write(t, "campaign.yaml", BINARY)],
                            ["campaign.yaml"]),
    "campaign-not-a-mapping": Case("parallel_exec", lambda t: campaign_args(t, "- 1\n- 2\n"), ["campaign.yaml"]),
    "campaign-executor-unknown": Case("parallel_exec", lambda t: campaign_with_config(t, "executor: pbs\n"),
                                      ["campaign.yaml", "executor"]),
    "campaign-group-number": Case("parallel_exec", lambda t: campaign_with_config(t, "group: [a]\n"),
                                  ["campaign.yaml", "group"]),
    "fanout-slurm-settings-unknown-key": Case(
        "parallel_exec", lambda t: fanout_args(t, "--executor", "slurm", "--slurm",
                                               write(t, "slurm.yaml", "partion: gpu\n")),
        ["slurm.yaml", "partion"]),
    "fanout-slurm-settings-binary": Case(
        "parallel_exec", lambda t: fanout_args(t, "--executor", "slurm", "--slurm", write(t, "slurm.yaml", BINARY)),
        ["slurm.yaml"]),
    # ------------------------------------------------------------------ bayesopt.py
    "bo-workers-0": Case("bayesopt", lambda t: bayesopt_args(t, "--workers", "0"), ["--workers"]),
    "bo-trials-0": Case("bayesopt", lambda t: bayesopt_args(t, "--trials", "0"), ["--trials"]),
    "bo-parallel-0": Case("bayesopt", lambda t: bayesopt_args(t, "--parallel", "0"), ["--parallel"]),
    "bo-set-model-foo": Case("bayesopt", lambda t: bayesopt_args(t, "--set", "model.foo=1"), ["--set", "model.foo"]),
    "bo-set-lr-nan": Case("bayesopt", lambda t: bayesopt_args(t, "--set", "network_weight.weight_decay=.nan"),
                          ["--set", "network_weight.weight_decay"]),
    "bo-nested-typo-in-config-file": Case(
        "bayesopt", lambda t: ["-c", DIGITS, BAYESOPT, write(t, "my.yaml", "model: {layer_size: [1]}\n"),
                               *bayesopt_args(t)[3:]], ["my.yaml", "layer_size"]),
    "bo-search-unknown-config-key": Case(
        "bayesopt", lambda t: search_args(t, "parameters: {network_weight.lrr: [-6, -1]}\n"),
        ["search.yaml", "network_weight.lrr"]),
    "bo-search-unknown-top-key": Case(
        "bayesopt", lambda t: search_args(t, "parameters: {lrate: [-6, -1]}\n"), ["search.yaml", "lrate"]),
    "bo-search-parameter-a-string": Case(
        "bayesopt", lambda t: search_args(t, "parameters: {network_weight.lr: '[-6, -1]'}\n"),
        ["search.yaml", "network_weight.lr"]),
    "bo-search-bounds-nan": Case(
        "bayesopt", lambda t: search_args(t, "parameters: {network_weight.lr: [.nan, -1]}\n"),
        ["search.yaml", "network_weight.lr"]),
    "bo-search-trials-two": Case("bayesopt", lambda t: _without(search_args(t, "trials: two\n"), "--trials"),
                                 ["search.yaml", "trials"]),
    "bo-search-parameters-5": Case("bayesopt", lambda t: search_args(t, "parameters: 5\n"),
                                   ["search.yaml", "parameters"]),
    "bo-search-binary": Case("bayesopt", lambda t: search_args(t, BINARY), ["search.yaml"]),
    "bo-search-unknown-key": Case("bayesopt", lambda t: search_args(t, "trails: 3\n"), ["search.yaml", "trails"]),
    "bo-corrupt-ax-client": Case("bayesopt", corrupt_ax_state, ["ax_client.json"]),
    "bo-log-root-is-a-file": Case("bayesopt", lambda t: bayesopt_args(t, "-l", a_file(t)), ["-l", "file"]),
    "bo-unknown-flag": Case("bayesopt", lambda t: bayesopt_args(t, "--bogus"), ["--bogus"]),
    "bo-binary-config": Case("bayesopt", lambda t: ["-c", write(t, "my.yaml", BINARY), BAYESOPT,
                                                    *bayesopt_args(t)[3:]], ["my.yaml"]),
    # ------------------------------------------------------------------ report.py
    "report-runs-dir-is-a-file": Case("report", lambda t: [a_file(t)], ["file"]),
    "report-final-not-a-mapping": Case("report", lambda t: [str(results_tree(t, {"final": 5}))],
                                       ["results.json", "final"]),
    "report-final-value-a-string": Case("report", lambda t: [str(results_tree(t, {"final": {"Loss/Test": "x"}}))],
                                        ["results.json", "Loss/Test"]),
    "report-wall-time-a-string": Case("report", lambda t: [str(results_tree(t, {"wall_time_s": "abc"}))],
                                      ["results.json", "wall_time_s"]),
    "report-status-a-number": Case("report", lambda t: [str(results_tree(t, {"status": 5}))],
                                   ["results.json", "status"]),
    "report-dataset-a-list": Case("report", lambda t: [str(results_tree(t, {"dataset": [1]}))],
                                  ["results.json", "dataset"]),
    "report-results-binary": Case("report", lambda t: [str(results_tree(t, raw=BINARY))], ["results.json"]),
    "report-results-a-list": Case("report", lambda t: [str(results_tree(t, raw=b"[1, 2]"))], ["results.json"]),
    "report-best-trials-a-string": Case(
        "report", lambda t: [str(results_tree(t, best={"trials": "many", "algorithm": "Random", "dataset": "Digits",
                                                       "final": {"Loss/Test": 0.4},
                                                       "total_training_time_s": 1.0}))],
        ["best.json", "trials"]),
    "report-unknown-flag": Case("report", lambda t: [str(results_tree(t)), "--bogus"], ["--bogus"]),
}

def invoke(command, argv):
    """Run one command in this process; ``(exit status or 'traceback', stderr text)``."""
    import importlib

    module = importlib.import_module(command)
    entry = module.cli if command == "train" else module.main
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            entry(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 -- a traceback is what we classify
            traceback.print_exc(file=stderr)
            code = "traceback"
    return code, stderr.getvalue()


def classify(case, tmp_path):
    """``(class, stderr)``: ok, ran-foreign-code, traceback, accepted, multi-line, wrong-message."""
    argv = case.build(tmp_path)
    code, error = invoke(case.command, argv)
    lines = [line for line in error.splitlines() if line.strip()]
    expected = [fragment.replace("{tmp}", str(tmp_path)) for fragment in case.expected]
    if case.marker and (tmp_path / "marker").exists():
        return "ran-foreign-code", error
    if code == "traceback" or "Traceback" in error:
        return "traceback", error
    if code != 2:
        return "accepted", error
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return "multi-line", error
    if not all(fragment in lines[0] for fragment in expected):
        return "wrong-message", error
    return "ok", error


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_naming_where_and_exit_2(name, tmp_path):
    case = CASES[name]
    outcome, error = classify(case, tmp_path)
    if case.marker:
        assert not (tmp_path / "marker").exists(), "a hostile pickle ran code"
    assert outcome == "ok", f"{outcome}: {error!r} (expected {case.expected})"


def test_the_battery_is_large():
    assert len(CASES) >= 60
    assert {case.command for case in CASES.values()} == {"train", "parallel_exec", "bayesopt", "report"}


# ------------------------------------------------------------------ loaders of teachers and commentaries

@pytest.mark.parametrize("loader", ["teacher-file", "train-with-commentary"])
@pytest.mark.parametrize("content", ["hostile-torch-file", "hostile-raw-pickle", "garbage"])
def test_teacher_and_commentary_loaders_refuse_hostile_files_and_run_nothing(loader, content, tmp_path):
    import commentaries
    from commentaries import storage
    from commentaries.loop import Context
    from errors import UserError

    make = {"hostile-torch-file": lambda: hostile_torch_file(tmp_path, "file.pt"),
            "hostile-raw-pickle": lambda: hostile_raw_pickle(tmp_path, "file.pt"),
            "garbage": lambda: write(tmp_path, "file.pt", BINARY)}[content]
    path = make()
    load = {"teacher-file": storage.load_teacher,
            "train-with-commentary": lambda file: commentaries.run(
                {"class": "TrainWithCommentary", "commentary": str(file)},
                Context(run_dir=tmp_path))}[loader]
    with pytest.raises(UserError) as error:
        load(path)
    assert "file.pt" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------ nothing lost

def test_a_checkpoint_is_plain_tensors_with_a_checksum(tmp_path):
    import torch

    import checkpoints

    state = saved_state(tmp_path)
    wrapper = torch.load(state, weights_only=True)  # loadable without running any code
    assert wrapper["format"] == "hypergrad-checkpoint" and len(wrapper["sha256"]) == 64
    assert checkpoints.read(state, "state.pt")["config"]["algorithm"] == "Random"


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [run_dir / ".checkpoint.pt.4242.tmp", run_dir / ".results.json.4242.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    train.main([DIGITS, RANDOM, tiny(tmp_path)], run_dir=run_dir, progress=False)
    assert not any(path.exists() for path in stale)
    assert (run_dir / "results.json").is_file()


def test_save_into_a_missing_directory_fails_before_training(tmp_path):
    code, error = invoke("train", train_args(tmp_path, "-S", str(tmp_path / "missing" / "s.pt")))
    assert code == 2 and "missing" in error
    assert not list((tmp_path / "runs").rglob("events.out.tfevents.*"))  # nothing trained


def test_bayesopt_prints_no_dependency_warning_before_its_error(tmp_path):
    """A real process (warnings print once per process): one line, after Ax is imported."""
    import subprocess

    arguments = corrupt_ax_state(tmp_path)
    answer = subprocess.run([sys.executable, str(ROOT / "bayesopt.py"), *arguments], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert answer.returncode == 2
    assert answer.stderr.count("\n") == 1 and answer.stderr.startswith("error: "), answer.stderr
    assert "ax_client.json" in answer.stderr


@pytest.mark.parametrize("script, flag, value", [
    ("bench/population.py", "--rounds", "0"),
    ("bench/device_population.py", "--members", "x"),
    ("bench/device_population.py", "--largest-from", "-1"),
], ids=["population-rounds-0", "device-members-not-a-number", "device-largest-from-negative"])
def test_benchmark_counts_below_one_are_one_line_errors(script, flag, value, tmp_path):
    """The benchmarks' counts (rounds, members, sizes) are integers >= 1:
    anything else is refused before any work, in one line (``--rounds 0``
    used to end in an IndexError traceback)."""
    import subprocess

    answer = subprocess.run([sys.executable, str(ROOT / script), flag, value], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert answer.returncode == 2
    assert answer.stderr.count("\n") == 1 and answer.stderr.startswith("error: "), answer.stderr
    assert script in answer.stderr and flag in answer.stderr and repr(value) in answer.stderr


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("HYPERGRAD_DATA", str(ROOT.parent / "shared" / "data"))
    import torch
    torch.set_num_threads(1)
    counts = {}
    only = sys.argv[1:]
    for name, case in CASES.items():
        if only and not any(part in name for part in only):
            continue
        with tempfile.TemporaryDirectory() as directory:
            previous = os.getcwd()
            os.chdir(directory)
            try:
                outcome, error = classify(case, Path(directory))
            except Exception as problem:  # noqa: BLE001 -- a broken case, not a result
                outcome, error = "case-error", repr(problem)
            finally:
                os.chdir(previous)
        counts[outcome] = counts.get(outcome, 0) + 1
        last = (error.strip().splitlines() or [""])[-1][:200]
        print(f"{outcome:16s} {name}: {last}", flush=True)
    print(f"{sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
