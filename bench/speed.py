"""Weight steps per second of Random, Ours_LR_Momentum and DiffThroughOpt.

    python bench/speed.py [--device cpu|cuda] [--threads 1] [--repeats 3]

Workloads: UCI energy (MLP 8-50-1, full batch of 614; real data from
$HYPERGRAD_DATA) and a Fashion-MNIST-shaped one (MLP 784-50-10, batch 50,
synthetic data of that shape). Algorithms are interleaved and each is timed
``--repeats`` times (best taken), so the Ours/Random ratio comes from one run
under the same machine load. Also times a whole 4,000-step UCI-energy
Ours_LR_Momentum run through ``train.main`` (its ``wall_time_s``: the training
loop, logging included), and the *autograd floor* of each workload: the
ratio Ours_LR_Momentum would reach if its hyperparameter step did nothing but
the autograd work the paper's algorithm requires.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import hypergradients  # noqa: E402
import train  # noqa: E402
from datasets import Data  # noqa: E402
from engine import Problem, Trainer  # noqa: E402

ALGORITHMS = ["Random", "Ours_LR_Momentum", "DiffThroughOpt"]


def fashion_mnist_shaped(device):
    generator = torch.Generator().manual_seed(0)

    def split(count):
        return (torch.randn(count, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (count,), generator=generator))

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = split(50000), split(10000), split(10000)
    return Data(train_x, train_y, valid_x, valid_y, test_x, test_y, task="classification",
                output_size=10, input_shape=(1, 28, 28), target_scale=None,
                name="FashionMNIST-shaped").to(device)


def make_trainer(dataset_file, algorithm, device, data=None):
    cfg = train.prepare(config.load([ROOT / "configs" / dataset_file,
                                     ROOT / "configs" / f"{algorithm}.yaml"],
                                    {"device": str(device)}))
    if data is None:
        problem = train.load_problem(cfg, device, torch.float32)
    else:
        import models
        model = models.build_model(cfg["model"], data).to(device)
        problem = Problem(model, models.build_loss(cfg["loss"]), data)
    return Trainer(cfg, problem, device, torch.float32)


def steps_per_second(trainer, hyperparameter_steps):
    trainer.step()  # warm-up
    if trainer.weights[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(hyperparameter_steps):
        trainer.step()
    trainer.weights[0].sum().item()  # wait for queued work
    elapsed = time.perf_counter() - start
    return hyperparameter_steps * trainer.network_weight_steps / elapsed


def mean_microseconds(function, count=200):
    function()
    start = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - start) / count * 1e6


def autograd_floor(trainer):
    """The time ratio Ours/Random would have if a hyperparameter step cost
    nothing beyond its unavoidable autograd work: the recorded step (training
    gradient with ``create_graph``), one validation gradient and
    ``rollback_distance - 1`` Hessian-vector products, each timed alone."""
    for _ in range(3):
        trainer.step()
    natural = trainer.hyperparameters.natural_detached()
    batch = trainer.training_batch()
    validation = trainer.validation_batch()

    def record():
        return hypergradients.unroll(trainer.problem.install(trainer.weights), trainer.state,
                                     trainer.optimiser, trainer.hyperparameters,
                                     trainer.problem.loss, [batch], linearise=True)

    window = record()
    end = tuple(w.detach() for w in window.end)
    vector = trainer.problem.validation_gradient(end, validation)
    products = trainer.method.rollback_distance - 1
    parts = {
        "recorded step": mean_microseconds(record),
        "validation gradient": mean_microseconds(
            lambda: trainer.problem.validation_gradient(end, validation)),
        f"{products} Hessian-vector products": products * mean_microseconds(
            lambda: hypergradients._vjp(window.last_grads, window.start, vector)),
    }
    fast = mean_microseconds(lambda: trainer.weight_step_(natural))
    steps = trainer.network_weight_steps
    floor = ((steps - 1) * fast + sum(parts.values())) / (steps * fast)
    return fast, parts, floor


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hyperparameter-steps", type=int, default=100)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    workloads = {"UCI energy (8-50-1, batch 614)": ("uci_energy.yaml", None),
                 "Fashion-MNIST-shaped (784-50-10, batch 50)":
                     ("fashion_mnist.yaml", fashion_mnist_shaped(device))}
    print(f"device {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for label, (dataset_file, data) in workloads.items():
        best = {name: 0.0 for name in ALGORITHMS}
        for _ in range(arguments.repeats):
            for name in ALGORITHMS:
                trainer = make_trainer(dataset_file, name, device, data)
                best[name] = max(best[name], steps_per_second(trainer,
                                                              arguments.hyperparameter_steps))
        print(f"\n{label}")
        for name in ALGORITHMS:
            print(f"  {name:18s} {best[name]:9.0f} weight steps/s   "
                  f"time ratio to Random {best['Random'] / best[name]:.2f}x")
        fast, parts, floor = autograd_floor(make_trainer(dataset_file, "Ours_LR_Momentum",
                                                         device, data))
        print(f"  autograd floor of Ours_LR_Momentum: {floor:.2f}x  (ordinary step {fast:.0f} us; "
              + ", ".join(f"{name} {value:.0f} us" for name, value in parts.items()) + ")")
    with tempfile.TemporaryDirectory() as log_root:
        results = train.main(["configs/uci_energy.yaml", "configs/Ours_LR_Momentum.yaml"],
                             {"device": str(device)}, log_root=log_root, progress=False)
    print(f"\nwhole UCI-energy Ours_LR_Momentum run: {results['network_weight_steps_done']} "
          f"weight steps, training loop {results['wall_time_s']:.2f} s "
          f"(logging every 100 steps included), final test loss "
          f"{results['final']['Loss/Test']:.4f}")


if __name__ == "__main__":
    main()
