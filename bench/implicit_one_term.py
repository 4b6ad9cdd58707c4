"""Outer steps of an implicit teaching method with a one-term Neumann series
(AttentionMasks, Augmentation: ``neumann_steps: 1``), with the core's
``hypergradients.implicit`` pulling back to the teacher alone (its default
for a one-term series) against the vjp in (weights, teacher) that also
computes the unused weight cotangent.

    python bench/implicit_one_term.py Commentary_AttentionMasks
    python bench/implicit_one_term.py Commentary_Augmentation --steps 10 --repeats 5

Blocks of ``--steps`` outer steps of one run (its steps continue from block
to block), the two routes interleaved block by block, the fastest block of
each taken.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import commentaries  # noqa: E402
import config as configuration  # noqa: E402
import hypergradients  # noqa: E402
import train  # noqa: E402
from commentaries.loop import Context, default_dtype  # noqa: E402

DATA = {"Commentary_AttentionMasks": "coloured_digits", "Commentary_Augmentation": "digits_augmentation"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("algorithm", choices=sorted(DATA))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    arguments = parser.parse_args(argv)
    sources = [str(ROOT / "configs" / f"{name}.yaml") for name in (DATA[arguments.algorithm], arguments.algorithm)]
    cfg = train.load_config(sources, configuration.normalise_overrides(arguments.set + ["device=cpu"]))
    context = Context.from_config(cfg, Path(tempfile.mkdtemp()), torch.device("cpu"), False)
    method = commentaries.build(cfg["teaching"], context)
    default = hypergradients._vjp_linearisation
    routes = {"teacher alone": default,
              "weights and teacher": lambda update, weight_products=True: default(update)}
    times = {name: [] for name in routes}
    with default_dtype(context.dtype):
        method.setup()
        method.outer_step(0)  # first-call costs out of the timed blocks
        step = 1
        for _ in range(arguments.repeats):
            for name, route in routes.items():
                hypergradients._vjp_linearisation = route
                started = time.perf_counter()
                for _ in range(arguments.steps):
                    method.outer_step(step)
                    step += 1
                times[name].append((time.perf_counter() - started) / arguments.steps)
    hypergradients._vjp_linearisation = default
    alone, both = min(times["teacher alone"]), min(times["weights and teacher"])
    print(f"{arguments.algorithm}: per outer step, pulled back to the teacher alone {alone * 1e3:.1f} ms, "
          f"with the weight cotangent {both * 1e3:.1f} ms (x{both / alone:.2f})")


if __name__ == "__main__":
    main()
