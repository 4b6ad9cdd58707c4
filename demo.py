"""The point in a minute on a CPU: tuning hyperparameters during training
rescues bad initialisations.

    python demo.py [--initialisations 5] [--hyperparameter-steps 100]

Draws a handful of random SGD initialisations (learning rate 10^U(-6,-1),
weight decay 10^U(-7,-2), momentum U(0,1), as in the paper), trains an MLP on
scikit-learn's bundled digits from each with fixed hyperparameters (Random)
and with Clarke et al.'s implicit hypergradients (Ours_LR_Momentum), and
prints the final test losses side by side.
"""
import argparse
import math
import tempfile

import torch

import train
from generators import natural_sgd

ALGORITHMS = ("Random", "Ours_LR_Momentum")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--initialisations", type=int, default=5)
    parser.add_argument("--hyperparameter-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    starts = natural_sgd(arguments.initialisations, arguments.seed)
    print(f"digits, MLP 64-50-10, {arguments.hyperparameter_steps * 10} weight steps per run\n")
    print(f"{'lr':>9} {'weight decay':>12} {'momentum':>8} | "
          + " | ".join(f"{name + ' test loss':>26}" for name in ALGORITHMS))
    with tempfile.TemporaryDirectory() as log_root:
        for start in starts:
            losses = []
            for algorithm in ALGORITHMS:
                results = train.main(["configs/digits.yaml", f"configs/{algorithm}.yaml"],
                                     {**start, "hyperparameter_steps":
                                      arguments.hyperparameter_steps, "device": "cpu"},
                                     log_root=log_root, progress=False)
                loss = results["final"]["Loss/Test"]
                accuracy = results["final"]["Accuracy/Test"]
                losses.append(f"{loss:10.4f} (acc {accuracy:6.1%})"
                              if results["status"] == "finished" else f"{'diverged':>26}")
            momentum = 1 / (1 + math.exp(-start["network_weight.momentum"]))
            print(f"{10 ** start['network_weight.lr']:9.2e} "
                  f"{10 ** start['network_weight.weight_decay']:12.2e} {momentum:8.2f} | "
                  + " | ".join(f"{text:>26}" for text in losses))


if __name__ == "__main__":
    main()
