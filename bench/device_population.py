"""Populations on a GPU: the issue's device check in one command (issue #11).

    python bench/device_population.py [--device cuda] [--algorithm Ours_LR_Momentum]
        [--members 1000] [--hyperparameter-steps 400] [--modes eager compiled]
        [--check-members 4] [--largest-from 1024] [--largest-up-to 1048576]
        [--deadline-s 540] [--json PATH]

A session lent a GPU has minutes of it, so this is prepared and tried on the
CPU (``--device cpu`` with small sizes) beforehand. Three parts, on UCI
energy (MLP 8-50-1, full batch 614; real data from ``$HYPERGRAD_DATA``),
each printed as it ends and saved to ``--json`` (rewritten after each part,
so a run cut short keeps what it measured):

1. **Same numbers.** ``--check-members`` members in float64, 20
   hyperparameter steps, as a population on the device and on the CPU:
   each member's final losses and hyperparameters, largest relative
   difference (different kernels, so rounding, not bit equality).
2. **Throughput.** ``--members`` members x ``--hyperparameter-steps`` x 10
   weight steps through ``population.main`` (every member's run directory,
   logs and results; after a small warm-up population), per mode. The
   issue's target: 1,000 Ours_LR_Momentum members x 4,000 weight steps in
   under 60 s.
3. **The largest N that fits.** The vectorised step alone (eager) on a
   population tiled from 8 built members, doubling N from ``--largest-from``
   until the device runs out of memory or ``--largest-up-to``, then halving
   the gap three times: peak memory and member weight steps per second at
   each N. Building N members with their run directories would take longer
   than the device is lent; the step's memory is the population's.

Parts are skipped, and said to be, once ``--deadline-s`` has passed.
"""
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import generators  # noqa: E402
import population  # noqa: E402
from engine import shaped_batches  # noqa: E402
from errors import CommandLine, UserError, at_least_one, exit_on_user_error  # noqa: E402
from trees import tree_map  # noqa: E402

os.environ.setdefault("HYPERGRAD_DATA", str(ROOT.parent / "shared" / "data"))
TARGET_SECONDS = 60.0  # the issue's: 1,000 UCI-energy Ours_LR_Momentum members x 4,000 weight steps


def config_files(algorithm):
    return [str(ROOT / "configs" / "uci_energy.yaml"), str(ROOT / "configs" / f"{algorithm}.yaml")]


def members(count, scratch, **overrides):
    folder = Path(tempfile.mkdtemp(dir=scratch))
    return [{"overrides": {**draw, "log_interval": 100, **overrides},
             "run_dir": str(folder / f"member_{index}"), "name": f"member_{index}"}
            for index, draw in enumerate(generators.generate("natural_sgd", count, seed=0))]


def synchronise(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def same_numbers(arguments, scratch):
    """Part 1: the device's members against the CPU's, float64."""
    outcome = {}
    for device in (arguments.device, "cpu"):
        results = population.main(config_files(arguments.algorithm), members(
            arguments.check_members, scratch, device=device, dtype="float64",
            hyperparameter_steps=20), log_root=scratch, progress=False)
        outcome[device] = [[r["final"][k] for k in sorted(r["final"])] +
                           [r["hyperparameters"][k] for k in sorted(r["hyperparameters"])]
                           for r in results]
    worst = max(abs(a - b) / max(abs(b), 1e-300)
                for here, there in zip(outcome[arguments.device], outcome["cpu"])
                for a, b in zip(here, there))
    return {"members": arguments.check_members, "largest_relative_difference": worst,
            "agree_to_1e-6": worst < 1e-6}


def throughput(arguments, scratch, mode):
    """Part 2: one whole population call, after a warm-up population."""
    compiled = mode == "compiled"
    files = config_files(arguments.algorithm)
    population.main(files, members(2, scratch, device=arguments.device, compile=compiled,
                                   hyperparameter_steps=1), log_root=scratch, progress=False)
    synchronise(arguments.device)
    started = time.perf_counter()
    results = population.main(files, members(
        arguments.members, scratch, device=arguments.device, compile=compiled,
        hyperparameter_steps=arguments.hyperparameter_steps), log_root=scratch, progress=False)
    synchronise(arguments.device)
    seconds = time.perf_counter() - started
    steps = sum(r["network_weight_steps_done"] for r in results)
    return {"mode": mode, "members": arguments.members, "seconds": seconds,
            "loop_seconds": max(r["wall_time_s"] for r in results),
            "compile_seconds": max(r.get("compile_time_s", 0.0) for r in results),
            "member_weight_steps_per_second": steps / seconds,
            "diverged": sum(r["status"] != "finished" for r in results),
            "weight_steps_per_member": steps // len(results)}


def tiled_population(arguments, scratch):
    """The program and a state of 8 built members, to tile to any N."""
    cfg, program, built, device = population.build_members(
        config_files(arguments.algorithm), members(8, scratch, device=arguments.device),
        scratch, None, None)
    for member in built:
        member.tracker.close()
    stepper = population.vectorised_program({**cfg, "compile": False}, program, device)
    return cfg, program, built, stepper, population.stack([m.state for m in built])


def step_at(n, cfg, program, built, stepper, seed_state, device):
    """Peak memory (bytes; None on the CPU) and member weight steps per second
    of the vectorised step for ``n`` members; raises torch.OutOfMemoryError."""
    rows = torch.arange(n, device=seed_state["weights"][0].device) % len(built)
    state = tree_map(lambda leaf: leaf.index_select(0, rows), seed_state)
    batches = shaped_batches(built[0].samplers, program, cfg["network_weight_steps"],
                             state["weights"][0].device, members=n)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    state, _ = stepper.step(state, batches)  # first call: allocations, kernels chosen
    synchronise(device.type)
    started, repeats = time.perf_counter(), 3
    for _ in range(repeats):
        state, _ = stepper.step(state, batches)
    synchronise(device.type)
    seconds = (time.perf_counter() - started) / repeats
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return peak, n * cfg["network_weight_steps"] / seconds


def largest(arguments, scratch, deadline):
    """Part 3: doubling, then bisecting, until out of memory."""
    cfg, program, built, stepper, seed_state = tiled_population(arguments, scratch)
    device = seed_state["weights"][0].device
    fits, tried, fitted, failed = [], [], None, None

    def attempt(n):
        try:
            peak, rate = step_at(n, cfg, program, built, stepper, seed_state, device)
            fits.append({"members": n, "peak_bytes": peak, "member_weight_steps_per_second": rate})
            memory = f"peak {peak / 2**30:.2f} GiB" if peak is not None else "peak not measured (CPU)"
            print(f"  N={n}: fits, {memory}, {rate:,.0f} member weight steps/s", flush=True)
            return True
        except torch.OutOfMemoryError:
            print(f"  N={n}: out of memory", flush=True)
            return False
        finally:
            tried.append(n)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    n = arguments.largest_from
    while n <= arguments.largest_up_to and time.monotonic() < deadline:
        if not attempt(n):
            failed = n
            break
        fitted, n = n, n * 2
    for _ in range(3):
        if fitted is None or failed is None or time.monotonic() >= deadline:
            break
        middle = (fitted + failed) // 2
        if attempt(middle):
            fitted = middle
        else:
            failed = middle
    return {"largest_that_fits": fitted, "smallest_out_of_memory": failed, "tried": tried,
            "fits": fits, "stopped_by": "out of memory" if failed else "limit or deadline"}


@exit_on_user_error
def main():
    parser = CommandLine(prog="bench/device_population.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--algorithm", default="Ours_LR_Momentum")
    parser.add_argument("--members", type=at_least_one, default=1000)
    parser.add_argument("--hyperparameter-steps", type=at_least_one, default=400, help="10 weight steps each")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--check-members", type=at_least_one, default=4)
    parser.add_argument("--largest-from", type=at_least_one, default=1024)
    parser.add_argument("--largest-up-to", type=at_least_one, default=1 << 20)
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="skip what is left after this many seconds")
    parser.add_argument("--json", help="write the figures here (after each part)")
    arguments = parser.parse_args()
    deadline = time.monotonic() + arguments.deadline_s
    name = torch.cuda.get_device_name() if arguments.device.startswith("cuda") else "cpu"
    report = {"device": name, "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(f"bench/device_population.py on {name}, torch {torch.__version__}", flush=True)

    def part(key, function, *extra):
        if time.monotonic() >= deadline:
            report[key] = "skipped: deadline"
        else:
            started = time.perf_counter()
            try:
                report[key] = function(*extra)
            except UserError as error:  # e.g. compile: torch.compile failed (...)
                report[key] = f"refused: {error}"
            print(f"{key} ({time.perf_counter() - started:.0f} s): {json.dumps(report[key])}",
                  flush=True)
        if arguments.json:
            temporary = Path(arguments.json + ".tmp")
            temporary.write_text(json.dumps(report, indent=1))
            temporary.replace(arguments.json)

    with tempfile.TemporaryDirectory() as scratch:
        part("same_numbers", same_numbers, arguments, scratch)
        for mode in arguments.modes:
            part(f"throughput_{mode}", throughput, arguments, scratch, mode)
        part("largest_n", largest, arguments, scratch, deadline)
    for mode in arguments.modes:
        figures = report.get(f"throughput_{mode}")
        if isinstance(figures, dict):
            print(f"{mode}: {figures['members']} {arguments.algorithm} members x "
                  f"{figures['weight_steps_per_member']} weight steps in {figures['seconds']:.1f} s "
                  f"(target for 1,000 x 4,000: under {TARGET_SECONDS:.0f} s)")


if __name__ == "__main__":
    main()
