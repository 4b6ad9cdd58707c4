"""Would kernel fusion (``torch.compile``) bring Ours/Random under 1.5x?

    python bench/compile_probe.py [--threads 1]

Times, on UCI-energy shapes (MLP 8-50-1, batch 614, synthetic data), one
ordinary SGD-with-momentum step and one Hessian-vector product of the
training loss, eager and compiled with ``torch.compile`` (inductor), both
written with ``torch.func``. Then prints the autograd floor each would give
Ours_LR_Momentum: ``(9 steps + recorded step + validation gradient + 4 HVPs)
/ 10 steps``, with the recorded step and the validation gradient counted as
one step each (a lower bound). Compilation time is printed too: it is paid
once per process.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp

from speed import best_microseconds


def loss(weights, inputs, targets):
    w1, b1, w2, b2 = weights
    return F.mse_loss(F.linear(torch.relu(F.linear(inputs, w1, b1)), w2, b2), targets)


def sgd_step(weights, buffers, inputs, targets, lr, weight_decay, momentum):
    grads = grad(loss)(weights, inputs, targets)
    direction = torch._foreach_add(grads, torch._foreach_mul(weights, weight_decay))
    buffers = torch._foreach_add(torch._foreach_mul(buffers, momentum), direction)
    return tuple(torch._foreach_sub(weights, torch._foreach_mul(buffers, lr))), tuple(buffers)


def hvp_forward_over_reverse(weights, vector, inputs, targets):
    return jvp(lambda w: grad(loss)(w, inputs, targets), (weights,), (vector,))[1]


def hvp_reverse_over_reverse(weights, vector, inputs, targets):
    _, pullback = vjp(lambda w: grad(loss)(w, inputs, targets), weights)
    return pullback(vector)[0]


def compiled(function, *arguments):
    started = time.perf_counter()
    function = torch.compile(function)
    function(*arguments)
    return function, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(614, 8, generator=generator)
    targets = torch.randn(614, 1, generator=generator)
    weights = (0.3 * torch.randn(50, 8, generator=generator),
               0.1 * torch.randn(50, generator=generator),
               0.1 * torch.randn(1, 50, generator=generator),
               0.1 * torch.randn(1, generator=generator))
    vector = tuple(torch.randn(w.shape, generator=generator) for w in weights)
    buffers = tuple(torch.zeros_like(w) for w in weights)
    hypers = (torch.tensor(0.01), torch.tensor(1e-4), torch.tensor(0.9))
    step_arguments = (weights, buffers, inputs, targets, *hypers)
    hvp_arguments = (weights, vector, inputs, targets)

    rows = []
    for label, step, hvp in (("eager", sgd_step, hvp_reverse_over_reverse),):
        rows.append((label, best_microseconds(lambda: step(*step_arguments)),
                     best_microseconds(lambda: hvp(*hvp_arguments)), 0.0))
    compiled_step, step_seconds = compiled(sgd_step, *step_arguments)
    for name, hvp in (("forward-over-reverse", hvp_forward_over_reverse),
                      ("reverse-over-reverse", hvp_reverse_over_reverse)):
        compiled_hvp, hvp_seconds = compiled(hvp, *hvp_arguments)
        rows.append((f"compiled, HVP {name}", best_microseconds(lambda: compiled_step(*step_arguments)),
                     best_microseconds(lambda: compiled_hvp(*hvp_arguments)),
                     step_seconds + hvp_seconds))
        step_seconds = 0.0  # the step is compiled once
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for label, step_us, hvp_us, seconds in rows:
        floor = (11 * step_us + 4 * hvp_us) / (10 * step_us)
        print(f"  {label:34s} step {step_us:6.0f} us   HVP {hvp_us:6.0f} us   "
              f"HVP/step {hvp_us / step_us:4.2f}   floor {floor:.2f}x   compile {seconds:5.1f} s")


if __name__ == "__main__":
    main()
