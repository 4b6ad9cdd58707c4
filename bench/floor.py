"""What a population of MLPs cannot go below on this machine, per member.

    python bench/floor.py [--members 64] [--layers 784 50 10] [--batch 50]
                          [--weight-steps 3000] [--log-interval 100] [--test-rows 10000]
                          [--final-rows 70000] [--separate-seconds S]

The defaults are the Fashion-MNIST shape as ``bench/population.py`` runs it
(300 hyperparameter steps of 10 weight steps, ``log_interval: 100``; for
Random the final metrics see the 60,000 training rows and the 10,000 test
rows). The cheapest method, plain SGD with momentum, must in every weight
step of every member:

* run its matrix products: per layer the forward product and the weight
  gradient, and for each layer after the first the gradient of its input,
  batched over members (``torch.bmm``), at the rate this core's BLAS gives
  for those shapes;
* gather its batch's rows from the shared data (``index_select``);
* update weights and momentum: read weights, momentum and gradient and write
  momentum and weights, five passes over the weights at a plain copy's rate;

and at every log interval, and once at the end, evaluate its weights on the
test rows (the population's first layer one folded matrix product over the
shared rows, ``models.FoldedLinear``). Everything else (activations, losses,
the hyperparameter update, logging) is taken as free, so this is a floor,
not an estimate. With ``--separate-seconds`` (one whole ``train.py`` run as a
separate process, measured on the same machine) it prints the most a
population could gain over separate processes here.
"""
import argparse
import time

import torch


def best_seconds(function, repeats=20):
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def weight_step_pieces(members, layers, batch, data_rows):
    """``{piece: seconds}`` of one population weight step's unavoidable work."""
    products = 0.0
    for index, (fan_in, fan_out) in enumerate(zip(layers, layers[1:])):
        inputs, weights = torch.randn(members, batch, fan_in), torch.randn(members, fan_in, fan_out)
        outputs = torch.randn(members, batch, fan_out)
        products += best_seconds(lambda: torch.bmm(inputs, weights))  # forward
        products += best_seconds(lambda: torch.bmm(outputs.mT, inputs))  # weight gradient
        if index:  # the input's gradient; none for the data
            products += best_seconds(lambda: torch.bmm(outputs, weights.mT))
    data = torch.randn(data_rows, layers[0])
    rows = torch.randint(0, data_rows, (members * batch,))
    gather = best_seconds(lambda: data.index_select(0, rows))
    size = members * sum(i * o + o for i, o in zip(layers, layers[1:]))
    source, target = torch.randn(size), torch.empty(size)
    update = 2.5 * best_seconds(lambda: target.copy_(source))  # a copy is two passes; the update five
    return {"matrix products": products, "batch gather": gather, "update (five passes)": update}


def evaluation_seconds_per_row(members, layers, chunk=4096):
    """Seconds per shared evaluation row for the whole population: the first
    layer folded into one matrix product, the others batched."""
    inputs = torch.randn(chunk, layers[0])
    first = torch.randn(layers[0], members * layers[1])
    seconds = best_seconds(lambda: inputs @ first, repeats=5)
    for fan_in, fan_out in zip(layers[1:], layers[2:]):
        hidden, weights = torch.randn(members, chunk, fan_in), torch.randn(members, fan_in, fan_out)
        seconds += best_seconds(lambda: torch.bmm(hidden, weights), repeats=5)
    return seconds / chunk


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[784, 50, 10])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--weight-steps", type=int, default=3000)
    parser.add_argument("--log-interval", type=int, default=100)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--final-rows", type=int, default=70000)
    parser.add_argument("--data-rows", type=int, default=60000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--separate-seconds", type=float,
                        help="one whole run as its own train.py process, seconds (measured here)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    n = arguments.members
    pieces = weight_step_pieces(n, arguments.layers, arguments.batch, arguments.data_rows)
    step = sum(pieces.values())
    per_row = evaluation_seconds_per_row(n, arguments.layers)
    intervals = arguments.weight_steps // arguments.log_interval
    training = arguments.weight_steps * step
    evaluations = per_row * (intervals * arguments.test_rows + arguments.final_rows)
    member = (training + evaluations) / n
    print(f"MLP {'-'.join(map(str, arguments.layers))}, {n} members, batch {arguments.batch}, "
          f"{arguments.threads} thread(s); floor of one population weight step:")
    for piece, seconds in pieces.items():
        print(f"  {piece:<22} {seconds * 1e3:7.2f} ms")
    print(f"  {'total':<22} {step * 1e3:7.2f} ms")
    print(f"evaluation: {per_row * 1e6 * arguments.test_rows / 1e3:.0f} ms per interval of "
          f"{arguments.test_rows:,} test rows for the population")
    print(f"whole run ({arguments.weight_steps:,} weight steps, {intervals} intervals, "
          f"{arguments.final_rows:,} final rows): training {training:.1f} s + evaluations "
          f"{evaluations:.1f} s = {member:.2f} s per member at the floor")
    if arguments.separate_seconds:
        print(f"against {arguments.separate_seconds:.2f} s per separate process: at most "
              f"{arguments.separate_seconds / member:.1f}x, compilation and start-up not counted")


if __name__ == "__main__":
    main()
