"""Peak memory of Algorithm 1 (backpropagation through K student steps) for
example-weighting commentaries, with and without the memory-bounded modes.

Backpropagating through ``K`` inner steps keeps every step's graph alive, so
memory grows linearly in ``K``. The bounded modes of the core's
``hypergradients.unrolled`` (which ``example_weighting.Problem`` calls) cap it:

* ``chunk_size=C``: exact gradient checkpointing -- only every ``C``-th weight
  state is kept; chunks are recomputed one at a time in the backward pass
  (same gradient, about one extra forward pass of compute);
* ``truncation=T``: backpropagate through the last ``T`` steps only (biased).

Measured quantity: the peak of live bytes torch allocates on the CPU during
the hypergradient call, from the profiler's allocation events
(``common.MemoryMeter``; ``torch.func`` refuses the saved-tensor hooks an
exact count of saved tensors would need, so this counts the step's
temporaries too); on CUDA ``torch.cuda.max_memory_allocated`` over the call
instead. Checks that the checkpointed gradient equals the full one.

    python bench/commentary_memory.py                      # CPU, K = 25 .. 200
    python bench/commentary_memory.py --device cuda --inner-steps 50 200 800
"""
import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
from commentaries import example_weighting  # noqa: E402
from commentaries.common import MemoryMeter, build_student, reset_weights  # noqa: E402
from train import write_json  # noqa: E402


def measure(problem, make_student, hyper, device, modes):
    """Peak allocated CPU bytes (None on CUDA), CUDA peak (or None), seconds and the gradient."""
    weights = reset_weights(make_student(), torch.Generator().manual_seed(0), device=device)
    batches = problem.sample_batches(torch.Generator().manual_seed(1))
    meter = MemoryMeter()
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        result = problem.hypergradient(weights, hyper, batches, **modes)
        torch.cuda.synchronize()
        return None, torch.cuda.max_memory_allocated() - baseline, time.perf_counter() - started, \
            result.value, result.gradient
    with meter.measure():
        result = problem.hypergradient(weights, hyper, batches, **modes)
    return meter.peak, None, time.perf_counter() - started, result.value, result.gradient


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--truncation", type=int, default=10)
    parser.add_argument("--student", default="CNN", choices=["CNN", "MLP"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="also write the rows as JSON here")
    arguments = parser.parse_args(argv)

    device = torch.device(arguments.device)
    data = datasets.load_data({"class": "RotatedDigits", "overlapping": True, "image_size": 16},
                              validation_proportion=0.2).to(device)
    spec = {"class": "CNN", "width": 16} if arguments.student == "CNN" else {"class": "MLP", "hidden": [64]}
    make_student = lambda: build_student(spec, data, "student").to(device)  # noqa: E731
    torch.manual_seed(0)
    teacher = example_weighting.build_teacher(data.input_shape, True, 8).to(device)
    hyper = {name: p.detach() for name, p in teacher.named_parameters()}
    rows = []
    print(f"device {device}, student {spec}, batch {arguments.batch_size}, "
          f"{sum(p.numel() for p in make_student().parameters())} student weights")
    print("| K | mode | peak allocated CPU MiB | CUDA peak MiB | seconds | max grad diff vs full |")
    print("|---|---|---|---|---|---|")
    for steps in arguments.inner_steps:
        problem = example_weighting.Problem(data, teacher, make_student(), curriculum=True, inner_steps=steps,
                                            inner_lr=0.1, batch_size=arguments.batch_size)
        reference = None
        modes_to_run = (("full", {}),
                        (f"checkpoint C={arguments.chunk_size}", {"chunk_size": arguments.chunk_size}),
                        (f"truncated T={arguments.truncation}", {"truncation": arguments.truncation}))
        for mode, modes in modes_to_run:
            peak, cuda_peak, seconds, loss, grads = measure(problem, make_student, hyper, device, modes)
            if reference is None:
                reference = grads
            difference = max(float((grads[name] - reference[name]).abs().max()) for name in grads)
            row = {"inner_steps": steps, "mode": mode, "cpu_allocated_peak_bytes": peak, "cuda_peak_bytes": cuda_peak,
                   "seconds": seconds, "max_grad_difference": difference, "validation_loss": float(loss)}
            rows.append(row)
            cuda = "-" if cuda_peak is None else f"{cuda_peak / 2**20:.1f}"
            cpu = "-" if peak is None else f"{peak / 2**20:.1f}"
            print(f"| {steps} | {mode} | {cpu} | {cuda} | {seconds:.2f} | {difference:.1e} |", flush=True)
    if arguments.output:
        write_json(arguments.output, rows)
    return rows


if __name__ == "__main__":
    main()
