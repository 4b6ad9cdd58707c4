"""Whether ``flush_denormal`` reaches every intra-op thread, and what it saves.

    python bench/denormal_threads.py [--threads 2] [--size 4000000]
        [--population 64 --hyperparameter-steps 300]

The pool starts before any flushing, as in a run (data loading and model
set-up run parallel operations first). Then an elementwise product over
float32 subnormals is timed and its subnormal results counted three ways:
unflushed; with ``torch.set_flush_denormal(True)`` alone, which sets the
calling thread's control register only; inside ``engine.denormals_flushed``,
which sets every thread of the pool. Fastest of 5 blocks of 10 products.

``--population N`` also trains N Ours_LR_Momentum members of the
Fashion-MNIST shape (synthetic images unless $HYPERGRAD_DATA holds the real
files; ``natural_sgd`` draws, seed 0) through ``population.main``, with
``flush_denormal`` true and then false, and prints the whole calls' seconds:
some members' weight decay drives their weights through the subnormals.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402
import generators  # noqa: E402
import population  # noqa: E402
from bench.population import fashion_data_root  # noqa: E402


def measure(subnormals):
    """``(ms per product, results still subnormal)``."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            subnormals * 0.5
        best = min(best, (time.perf_counter() - start) / 10)
    return best * 1e3, int((subnormals * 0.5).count_nonzero())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4_000_000)
    parser.add_argument("--population", type=int, default=0, help="members (0: no population)")
    parser.add_argument("--hyperparameter-steps", type=int, default=300)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    # bits 713000 as float32: about 1e-39, a subnormal (no float conversion, which would flush it)
    subnormals = torch.full((arguments.size,), 713000, dtype=torch.int32).view(torch.float32)
    measure(subnormals)  # the pool runs before any flushing
    print(f"{arguments.threads} thread(s), {arguments.size:,} float32 subnormals, x * 0.5:")
    rows = [("unflushed", measure(subnormals))]
    torch.set_flush_denormal(True)
    rows.append(("torch.set_flush_denormal(True) alone", measure(subnormals)))
    torch.set_flush_denormal(False)
    with engine.denormals_flushed(True):
        rows.append(("engine.denormals_flushed(True)", measure(subnormals)))
    rows.append(("after it (setting restored)", measure(subnormals)))
    for label, (ms, kept) in rows:
        print(f"  {label:40s} {ms:7.2f} ms per product, {kept:,} results subnormal")
    if arguments.population:
        print(f"{arguments.population} Ours_LR_Momentum members, Fashion-MNIST shape, "
              f"{arguments.hyperparameter_steps} hyperparameter steps, {arguments.threads} thread(s):",
              flush=True)
        for flush in (True, False):
            seconds = train_population(arguments.population, arguments.hyperparameter_steps, flush)
            print(f"  flush_denormal: {str(flush).lower():5s} {seconds:7.1f} s whole", flush=True)


def train_population(size, steps, flush):
    """Seconds of one whole ``population.main`` call."""
    with tempfile.TemporaryDirectory() as scratch:
        data_root, _ = fashion_data_root(scratch + "/data")
        common = {"hyperparameter_steps": steps, "device": "cpu", "data_root": data_root,
                  "dataset.download": False, "flush_denormal": flush}
        members = [{"overrides": {**draw, **common}, "run_dir": f"{scratch}/m{index}", "name": None}
                   for index, draw in enumerate(generators.generate("natural_sgd", size, seed=0))]
        start = time.perf_counter()
        population.main([ROOT / "configs" / "fashion_mnist.yaml",
                         ROOT / "configs" / "Ours_LR_Momentum.yaml"], members, progress=False)
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
