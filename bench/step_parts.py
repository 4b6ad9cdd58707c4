"""Where a compiled hyperparameter step's time goes, Random against Ours_LR_Momentum.

    python bench/step_parts.py [--workload fashion|uci] [--rounds 40]

Runs real hyperparameter steps of both algorithms with ``compile: true``,
interleaved five steps at a time, and times each part separately: computing
the natural hyperparameters, each batch gather, each ordinary weight step by
its position in the hyperparameter step, and (Ours) the fused
hyperparameter step with its two gathers. Prints median/best µs per part and
the ratio of the median whole hyperparameter steps. The loop below is
:meth:`engine.Trainer.step` for the compiled path, spelled out with a timer
between the parts; ``bench/speed.py`` times the real method.
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402


def timed_step(trainer, parts):
    clock = time.perf_counter
    started = clock()
    natural = trainer.hyperparameters.natural_detached()
    parts["natural"].append(clock() - started)
    recorded = trainer.method.differentiable_steps(trainer.network_weight_steps)
    for position in range(trainer.network_weight_steps - recorded):
        before = clock()
        batch = trainer.training_batch()
        gathered = clock()
        trainer.weights, trainer.state, _ = trainer.compiled.weight_step(
            trainer.weights, trainer.state, natural, *batch)
        parts["gather"].append(gathered - before)
        parts[f"step {position}"].append(clock() - gathered)
        trainer.weight_step += 1
    if recorded:
        before = clock()
        batch, validation = trainer.training_batch(), trainer.validation_batch()
        gathered = clock()
        trainer.weights, trainer.state, _, _ = trainer.compiled.hyperparameter_step(
            trainer.weights, trainer.state, *batch, *validation)
        parts["two gathers"].append(gathered - before)
        parts["fused step"].append(clock() - gathered)
        trainer.weight_step += recorded
    trainer.hyperparameter_step += 1
    parts["whole hyperparameter step"].append(clock() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["fashion", "uci"], default="fashion")
    parser.add_argument("--rounds", type=int, default=40)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    dataset_file, data = {"uci": ("uci_energy.yaml", None),
                          "fashion": ("fashion_mnist.yaml", speed.fashion_mnist_shaped(device))
                          }[arguments.workload]
    trainers = {name: speed.make_trainer(dataset_file, name, device, data, compile=True)
                for name in ("Random", "Ours_LR_Momentum")}
    timings = {name: defaultdict(list) for name in trainers}
    for trainer in trainers.values():
        for _ in range(5):
            timed_step(trainer, defaultdict(list))  # warm-up
    for _ in range(arguments.rounds):
        for name, trainer in trainers.items():
            for _ in range(5):
                timed_step(trainer, timings[name])
    for name, parts in timings.items():
        print(f"{name} (median/best us):")
        print("  " + ", ".join(f"{part} {statistics.median(values) * 1e6:.0f}/"
                               f"{min(values) * 1e6:.0f}" for part, values in parts.items()))
    whole = {name: statistics.median(parts["whole hyperparameter step"])
             for name, parts in timings.items()}
    print(f"ratio of median hyperparameter steps, Ours/Random: "
          f"{whole['Ours_LR_Momentum'] / whole['Random']:.2f}x")


if __name__ == "__main__":
    main()
