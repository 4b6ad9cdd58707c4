"""Outer steps per second of a pure teaching method (ExampleWeighting, GTN),
eager against ``compile: true`` (``torch.compile`` of the same pure outer
step by :func:`engine.compiler`), alone or vmapped over a population.

    python bench/teaching_compile.py Commentary_ExampleWeighting
    python bench/teaching_compile.py GTN_Curriculum --members 4 --set dtype=float64

The method is built from ``configs/<data>.yaml`` + ``configs/<algorithm>.yaml``
(+ ``--set``); ``--steps`` outer steps are drawn once and replayed from the
same initial state in ``--repeats`` blocks, eager and compiled interleaved
block by block, the fastest block of each taken, so the ratio comes from one
run under the same load. Also prints the compile time and the largest
relative difference between the compiled and the eager final state.
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
import train  # noqa: E402
from commentaries.loop import Context, default_dtype  # noqa: E402
from engine import compiler  # noqa: E402
from teaching_population import config_files  # noqa: E402  (bench/)
from step import stack  # noqa: E402
from trees import tree_leaves  # noqa: E402



def build(sources, settings, seed, device):
    cfg = train.load_config(sources, configuration.normalise_overrides(settings + [f"seed={seed}"]))
    context = Context.from_config(cfg, Path(tempfile.mkdtemp()), device, False)
    torch.manual_seed(seed)
    method = commentaries.build(cfg["teaching"], context)
    with default_dtype(context.dtype):
        method.setup()
    return method, context


def replay(step, state, inputs, device):
    started = time.perf_counter()
    for draws in inputs:
        state, _ = step(state, draws)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("algorithm", help="a configs/<algorithm>.yaml of a pure teaching method")
    parser.add_argument("--members", type=int, default=0, help="N > 0: a vmapped population of N seeds")
    parser.add_argument("--steps", type=int, default=10, help="outer steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    arguments = parser.parse_args(argv)
    sources = config_files(arguments.algorithm)
    settings = arguments.set + [f"device={arguments.device}"]
    device = torch.device(arguments.device)
    seeds = range(max(arguments.members, 1))
    methods, context = zip(*[build(sources, settings, seed, device) for seed in seeds])
    context = context[0]
    with default_dtype(context.dtype):
        if arguments.members:
            eager = torch.func.vmap(methods[0].pure_outer_step, randomness="error")
            state = stack([method.outer_state() for method in methods])
            inputs = [stack([method.outer_inputs(k) for method in methods]) for k in range(arguments.steps)]
        else:
            eager, state = methods[0].pure_outer_step, methods[0].outer_state()
            inputs = [methods[0].outer_inputs(k) for k in range(arguments.steps)]
        compiled = compiler(device)(eager)
        started = time.perf_counter()
        compiled(state, inputs[0])
        compile_time = time.perf_counter() - started
        times = {"eager": [], "compiled": []}
        for _ in range(arguments.repeats):
            for name, step in (("eager", eager), ("compiled", compiled)):
                elapsed, final = replay(step, state, inputs, device)
                times[name].append(elapsed / arguments.steps)
                times[f"{name} state"] = final
    difference = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                     for a, b in zip(tree_leaves(times["compiled state"]), tree_leaves(times["eager state"]))
                     if a.is_floating_point())
    eager_s, compiled_s = min(times["eager"]), min(times["compiled"])
    population = f"population of {arguments.members}" if arguments.members else "one run"
    print(f"{arguments.algorithm} ({population}, {context.dtype}, {arguments.device}): per outer step eager "
          f"{eager_s * 1e3:.1f} ms, compiled {compiled_s * 1e3:.1f} ms (x{eager_s / compiled_s:.2f}); "
          f"compile {compile_time:.1f} s; largest relative state difference {difference:.1e}")


if __name__ == "__main__":
    main()
