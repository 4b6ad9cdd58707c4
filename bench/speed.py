"""Weight steps per second of Random, Ours_LR_Momentum and DiffThroughOpt.

    python bench/speed.py [--device cpu|cuda] [--threads 1] [--repeats 30]
                          [--hyperparameter-steps 10] [--whole-runs 3] [--compile]
    python bench/speed.py --population 64 [--population-workload uci|fashion]
                          [--population-algorithms Random ...]  # vectorised pure step against one run

Workloads: UCI energy (MLP 8-50-1, full batch of 614; real data from
$HYPERGRAD_DATA) and a Fashion-MNIST-shaped one (MLP 784-50-10, batch 50,
synthetic data of that shape). Each algorithm is timed over ``--repeats``
short blocks of ``--hyperparameter-steps`` hyperparameter steps, the
algorithms interleaved block by block and the fastest block taken, so the
Ours/Random ratio comes from one run under the same machine load. Also times
whole 4,000-step UCI-energy Random and Ours_LR_Momentum runs through
``train.main`` (their ``wall_time_s``: the training loop, logging included),
and the *step-parts floor* of each workload: the ratio Ours_LR_Momentum
would reach if nothing in the loop cost anything beyond the two pieces of
its pure step (a plain weight step, the hyperparameter update), each timed
alone. ``--compile`` runs every algorithm with ``compile: true``
(compilation before the timed loops).
"""
import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import population  # noqa: E402
import train  # noqa: E402
from datasets import Data  # noqa: E402
from engine import Problem, Trainer  # noqa: E402

ALGORITHMS = ["Random", "Ours_LR_Momentum", "DiffThroughOpt"]
COMPILABLE = set(ALGORITHMS)  # compile: true wraps the same pure step for every method


def fashion_mnist_shaped(device):
    generator = torch.Generator().manual_seed(0)

    def split(count):
        return (torch.randn(count, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (count,), generator=generator))

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = split(50000), split(10000), split(10000)
    return Data(train_x, train_y, valid_x, valid_y, test_x, test_y, task="classification",
                output_size=10, input_shape=(1, 28, 28), target_scale=None,
                name="FashionMNIST-shaped").to(device)


def make_trainer(dataset_file, algorithm, device, data=None, compile=False):
    cfg = train.prepare(config.load([ROOT / "configs" / dataset_file,
                                     ROOT / "configs" / f"{algorithm}.yaml"],
                                    {"device": str(device), "compile": compile}))
    if data is None:
        problem = train.load_problem(cfg, device, torch.float32)
    else:
        import models
        model = models.build_model(cfg["model"], data).to(device)
        problem = Problem(model, models.build_loss(cfg["loss"]), data)
    trainer = Trainer(cfg, problem, device, torch.float32)
    trainer.warm_up()
    return trainer


def seconds_per_block(trainer, hyperparameter_steps):
    """Wall time of ``hyperparameter_steps`` consecutive hyperparameter steps."""
    synchronise = torch.cuda.synchronize if trainer.weights[0].is_cuda else (lambda: None)
    synchronise()
    start = time.perf_counter()
    for _ in range(hyperparameter_steps):
        trainer.step()
    trainer.weights[0].sum().item()  # wait for queued work
    return time.perf_counter() - start


def best_microseconds(function, count=50, repeats=7):
    """Best mean over ``repeats`` blocks of ``count`` calls."""
    return interleaved_microseconds({"f": function}, count, repeats)["f"]


def interleaved_microseconds(functions, count=20, repeats=30):
    """``{name: best mean µs per call}`` over ``repeats`` rounds, each timing
    a block of ``count`` calls of every function in turn: the parts of one
    ratio are measured under the same machine load."""
    for function in functions.values():
        function()
    best = dict.fromkeys(functions, math.inf)
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(count):
                function()
            best[name] = min(best[name], (time.perf_counter() - start) / count * 1e6)
    return best


def step_parts(trainer):
    """The two pieces of Ours_LR_Momentum's pure step (:mod:`step`), timed
    alone and interleaved, as the trainer runs them (compiled with
    ``--compile``): a plain weight step and the hyperparameter update (the
    recorded update, validation gradient, Neumann products, outer optimiser
    and clipping). Returns the plain step's time, the parts and the ratio to
    Random the step would have if nothing else in the loop cost anything."""
    for _ in range(3):
        trainer.step()
    program, state = trainer.step_program, trainer.state
    batches = trainer.samplers.batches(trainer.program, trainer.network_weight_steps)
    training = [program.rows("training", indices) for indices in batches["training"]]
    validation = program.rows(program.validation_split, batches["validation"])
    parts = interleaved_microseconds({
        "plain weight step": lambda: program.weight_step_function(state, training[0]),
        "hyperparameter update": lambda: program.hyperparameter_update_function(
            state, training[-1:], validation)})
    fast = parts.pop("plain weight step")
    steps = trainer.network_weight_steps
    return fast, parts, ((steps - 1) * fast + parts["hyperparameter update"]) / (steps * fast)


def bench_module(name):
    """A script of ``bench/`` (whose names may equal the library's modules)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def population_speed(size, device, workload="uci", repeats=5, hyperparameter_steps=3,
                     algorithms=("Random", "Ours_LR_Momentum")):
    """Member weight steps per second of one vmapped pure step over ``size``
    members (``natural_sgd`` draws) against the single-run pure step,
    interleaved, best block; no logging. ``workload``: UCI energy (full
    batch) or the Fashion-MNIST shape (batches of 50 drawn by the members'
    own samplers; synthetic images in torchvision's format, as
    ``bench/population.py`` writes them when the real files are absent).
    The allocator is set as ``population.main`` sets it
    (:func:`engine.keep_freed_memory`), for the single run too."""
    import generators
    from engine import keep_freed_memory
    fashion_data_root = bench_module("population").fashion_data_root
    from step import stack, vectorised
    keep_freed_memory()
    lines = []
    with tempfile.TemporaryDirectory() as scratch:
        files, common = ["uci_energy.yaml"], {}
        if workload == "fashion":
            root, description = fashion_data_root(scratch)
            files, common = ["fashion_mnist.yaml"], {"data_root": root, "dataset.download": False}
            lines.append(f"  Fashion-MNIST shape: {description}")
        for algorithm in algorithms:
            members = [{"overrides": {**override, **common, "device": str(device)},
                        "run_dir": None, "name": None}
                       for override in generators.generate("natural_sgd", size, 0)]
            cfg, program, built, _ = population.build_members(
                [ROOT / "configs" / name for name in files + [f"{algorithm}.yaml"]],
                members, scratch, None, None)
            for member in built:
                member.tracker.close()
            vmapped, single = program.wrapped(vectorised), program
            states = {"population": stack([m.state for m in built]), "single": built[0].state}
            steps = cfg["network_weight_steps"]
            together_batches = population.batches(built, program, steps)

            def first(indices):
                return None if indices is None else indices[0]

            batches = {"population": together_batches,
                       "single": {"training": [first(i) for i in together_batches["training"]],
                                  "validation": first(together_batches["validation"])}}
            runners = {"population": vmapped, "single": single}

            def block(name):
                state = states[name]
                for _ in range(hyperparameter_steps):
                    state, _ = runners[name].step(state, batches[name])
                state["weights"][0].sum().item()

            best = interleaved_microseconds({name: lambda n=name: block(n) for name in runners},
                                            count=1, repeats=repeats)
            per_step = {name: value / (hyperparameter_steps * steps) for name, value in best.items()}
            together = size / per_step["population"] * 1e6
            alone = 1 / per_step["single"] * 1e6
            lines.append(f"  {algorithm:18s} N={size}: {together:8.0f} member weight steps/s "
                         f"vectorised, {alone:6.0f} for one run alone ({together / alone:.1f}x)")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30,
                        help="interleaved timing blocks per algorithm (best taken)")
    parser.add_argument("--hyperparameter-steps", type=int, default=10,
                        help="hyperparameter steps per timing block")
    parser.add_argument("--compile", action="store_true",
                        help="compile: true for Random and Ours_LR_Momentum")
    parser.add_argument("--whole-runs", type=int, default=3,
                        help="whole 4,000-step runs per algorithm (best taken)")
    parser.add_argument("--population", type=int, metavar="N",
                        help="only: populations of N members against one run (pure step)")
    parser.add_argument("--population-workload", choices=["uci", "fashion"], default="uci",
                        help="with --population: UCI energy or the Fashion-MNIST shape")
    parser.add_argument("--population-algorithms", nargs="+",
                        default=["Random", "Ours_LR_Momentum"], help="with --population")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    if arguments.population:
        print(f"device {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
        print("\n".join(population_speed(arguments.population, device,
                                          arguments.population_workload,
                                          algorithms=arguments.population_algorithms)))
        return
    workloads = {"UCI energy (8-50-1, batch 614)": ("uci_energy.yaml", None),
                 "Fashion-MNIST-shaped (784-50-10, batch 50)":
                     ("fashion_mnist.yaml", fashion_mnist_shaped(device))}
    print(f"device {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for label, (dataset_file, data) in workloads.items():
        # Short blocks, interleaved, best of many: robust to the bursts of
        # contention a shared machine has, and the same conditions for all.
        trainers = {name: make_trainer(dataset_file, name, device, data,
                                       compile=arguments.compile and name in COMPILABLE)
                    for name in ALGORITHMS}
        for trainer in trainers.values():
            seconds_per_block(trainer, 3)  # warm-up
        fastest = {name: math.inf for name in ALGORITHMS}
        for _ in range(arguments.repeats):
            for name, trainer in trainers.items():
                fastest[name] = min(fastest[name],
                                    seconds_per_block(trainer, arguments.hyperparameter_steps))
        best = {name: arguments.hyperparameter_steps * trainers[name].network_weight_steps
                / fastest[name] for name in ALGORITHMS}
        print(f"\n{label}")
        for name in ALGORITHMS:
            label = name + (" (eager)" if arguments.compile and name not in COMPILABLE else "")
            print(f"  {label:26s} {best[name]:9.0f} weight steps/s   "
                  f"time ratio to Random {best['Random'] / best[name]:.2f}x")
        fast, parts, floor = step_parts(trainers["Ours_LR_Momentum"])
        print(f"  step-parts floor of Ours_LR_Momentum: {floor:.2f}x  (plain step {fast:.0f} us; "
              + ", ".join(f"{name} {value:.0f} us ({value / fast:.2f} steps)"
                          for name, value in parts.items()) + ")")
    for algorithm in ("Random", "Ours_LR_Momentum"):
        runs = []
        for _ in range(arguments.whole_runs):
            with tempfile.TemporaryDirectory() as log_root:
                runs.append(train.main(["configs/uci_energy.yaml", f"configs/{algorithm}.yaml"],
                                       {"device": str(device), "compile": arguments.compile},
                                       log_root=log_root, progress=False))
        times = sorted(run["wall_time_s"] for run in runs)
        print(f"\nwhole UCI-energy {algorithm} run: {runs[0]['network_weight_steps_done']} "
              f"weight steps, training loop {times[0]:.2f} s best of {len(times)} "
              f"(all: {', '.join(f'{t:.2f}' for t in times)}; logging every 100 steps "
              f"included), final test loss {runs[0]['final']['Loss/Test']:.4f}"
              + (f", compilation before the loop {runs[0]['compile_time_s']:.1f} s"
                 if arguments.compile else ""))


if __name__ == "__main__":
    main()
