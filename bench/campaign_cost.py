"""What a campaign costs, from measured per-weight-step times.

    python bench/campaign_cost.py campaigns/cifar10.yaml [more campaigns ...]
        [--device cpu|cuda] [--threads 1] [--repeats 5] [--max-window 200] [--algorithms ...]

For every algorithm of a campaign, builds the run its first repetition
would be (the same config stack and overrides), times ``--repeats``
hyperparameter steps one by one after an untimed one, takes the fastest, and multiplies the time per weight step by the
run's weight steps and the campaign's repetitions. Logging and evaluation
are not timed (they cost little at the configs' log intervals).

Datasets whose files are missing here (Fashion-MNIST, CIFAR-10, Penn
Treebank) are replaced by random data of the real shape: a step's cost
depends on the batch and the model, not on the values. Hyperparameter steps
longer than ``--max-window`` weight steps (the Standalone/Full unrolled
Diff-through-Opt variants: 1,000 to 10,000 recorded updates) are timed with
``--max-window``-step windows, whose cost per weight step is about that of
the longer ones but without the memory traffic of the longer graph: read
those rows as lower bounds.

The summary gives the total device time (one device, runs one after
another) and the wall time on a SLURM cluster that runs every algorithm's
array at once with ``array_parallelism`` runs each (from the campaign's
``slurm`` settings).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import datasets  # noqa: E402
import executors  # noqa: E402
import models  # noqa: E402
import parallel_exec  # noqa: E402
import train  # noqa: E402
from engine import Problem, Trainer  # noqa: E402

# dataset class -> (input shape, classes, task, rows, input dtype) for stand-in data
SHAPES = {
    "FashionMNIST": ((1, 28, 28), 10, "classification", 50000),
    "CIFAR10": ((3, 32, 32), 10, "classification", 45000),
    "PennTreebank": ((35,), 10000, "language_model", 26520),
}
STAND_IN_ROWS = 2000  # enough for distinct minibatches; the cost does not depend on it


def stand_in(dataset_class, device):
    shape, classes, task, _ = SHAPES[dataset_class]
    generator = torch.Generator().manual_seed(0)

    def split(count):
        if task == "language_model":
            tokens = torch.randint(0, classes, (count, shape[0] + 1), generator=generator)
            return tokens[:, :-1], tokens[:, 1:]
        return (torch.randn(count, *shape, generator=generator),
                torch.randint(0, classes, (count,), generator=generator))

    (tx, ty), (vx, vy), (sx, sy) = split(STAND_IN_ROWS), split(STAND_IN_ROWS // 4), split(100)
    return datasets.Data(tx, ty, vx, vy, sx, sy, task=task, output_size=classes,
                         input_shape=shape, target_scale=None,
                         name=f"{dataset_class}-shaped").to(device)


def build(job, device, max_window):
    """A Trainer for one planned job; (trainer, weight steps of the run, scale)."""
    cfg = train.prepare(config.load(job["config"], {**job["overrides"], "device": str(device)}))
    run_steps = cfg["hyperparameter_steps"] * cfg["network_weight_steps"]
    scale = 1.0
    if cfg["network_weight_steps"] > max_window:
        scale = cfg["network_weight_steps"] / max_window
        cfg["network_weight_steps"] = max_window
    try:
        problem = train.load_problem(cfg, device, torch.float32)
        real = True
    except datasets.DataError:
        data = stand_in(cfg["dataset"]["class"], device)
        model = models.build_model(cfg["model"], data).to(device)
        problem = Problem(model, models.build_loss(cfg["loss"]), data)
        real = False
    trainer = Trainer(cfg, problem, device, torch.float32)
    trainer.warm_up()
    return trainer, run_steps, scale, real


def seconds_per_weight_step(trainer, repeats):
    """Best of ``repeats`` timed hyperparameter steps, after one untimed one:
    the machine is shared, and the fastest block is the least disturbed."""
    synchronise = torch.cuda.synchronize if trainer.weights[0].is_cuda else (lambda: None)
    trainer.step()  # untimed: allocations, first-call overheads
    best = math.inf
    for _ in range(repeats):
        trainer.weights[0].sum().item()
        synchronise()
        start = time.perf_counter()
        trainer.step()
        trainer.weights[0].sum().item()
        synchronise()
        best = min(best, time.perf_counter() - start)
    return best / trainer.network_weight_steps


def hours(seconds):
    return f"{seconds / 3600:,.1f} h" if seconds >= 7200 else f"{seconds / 60:,.1f} min"


def cost(campaign, device, repeats, max_window, only=None):
    arguments = parallel_exec.build_parser().parse_args(["--campaign", str(campaign),
                                                         "-l", "/nonexistent"])
    options = parallel_exec.resolve_options(arguments)
    jobs = parallel_exec.plan(options)
    repetitions = options["repetitions"]
    parallelism = executors.read_slurm_config(options["slurm"])["array_parallelism"] \
        if options.get("slurm") else None
    print(f"\n{campaign}: {repetitions} repetitions x {len(options['algorithms'])} algorithms "
          f"on {device}")
    print(f"{'algorithm':<46} {'ms/step':>9} {'steps/run':>10} {'run':>10} {'all runs':>10}")
    total, longest = 0.0, 0.0
    for algorithm in options["algorithms"]:
        if only and algorithm not in only:
            continue
        job = next(j for j in jobs if j["algorithm"] == algorithm)
        trainer, run_steps, scale, real = build(job, device, max_window)
        per_step = seconds_per_weight_step(trainer, repeats)
        run = per_step * run_steps
        total += run * repetitions
        if parallelism:
            longest = max(longest, math.ceil(repetitions / parallelism) * run)
        note = ("" if real else " (stand-in data)") + (f" (timed at {max_window})" if scale > 1 else "")
        print(f"{algorithm + note:<46} {per_step * 1e3:9.2f} {run_steps:10d} {hours(run):>10} "
              f"{hours(run * repetitions):>10}", flush=True)
        del trainer
    print(f"total on one device, runs one after another: {hours(total)}")
    if parallelism:
        print(f"SLURM, every algorithm's array at once, {parallelism} runs each: "
              f"about {hours(longest)} wall time")
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaigns", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed hyperparameter steps per algorithm (the fastest counts)")
    parser.add_argument("--algorithms", nargs="+", help="only these (default: the campaign's)")
    parser.add_argument("--max-window", type=int, default=200)
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    print(f"torch {torch.__version__}, {arguments.threads} thread(s), device {device}")
    for campaign in arguments.campaigns:
        cost(campaign, device, arguments.repeats, arguments.max_window, arguments.algorithms)


if __name__ == "__main__":
    main()
