"""Member weight steps per second of vectorised populations against separate runs.

    python bench/population.py [--sizes 1 8 64 256 1024] [--max-size 64]
        [--hyperparameter-steps 20] [--algorithms Random Ours_LR_Momentum DiffThroughOpt]
        [--baseline-hyperparameter-steps 400] [--workloads uci fashion] [--threads 1] [--processes 2]
        [--modes eager compiled] [--rounds 1] [--population-processes]
        [--campaign [--campaign-repetitions 200] [--campaign-population-size 100]
                    [--campaign-sample 4] [--workers 2]]

Workloads: UCI energy (MLP 8-50-1, full batch of 614; real data from
$HYPERGRAD_DATA) and the Fashion-MNIST shape (MLP 784-50-10, batch 50): the
real files when $HYPERGRAD_DATA/FashionMNIST/raw holds them, otherwise
synthetic images and labels of that shape written in torchvision's format
to a temporary data root (the output says which).

Everything goes through the public entry points, so it measures what users
get: ``train.py`` as separate processes (the whole process: start-up,
imports, data loading, training, logging; how ``parallel_exec.py`` ran each
run before populations), ``train.main`` in this process (data loading,
training and logging; after one warm-up call), and ``population.main``
for populations of N members, each with its own ``natural_sgd``
initialisation and seed (the draws ``parallel_exec.py`` makes), after a
warm-up population (this process's one-time imports of dynamo and inductor,
as the in-process runs have a warm-up run: a campaign's worker pays them once
for all its populations); ``--population-processes`` also times each
population as one whole ``train.py --population N`` process, cold, as a
separate process is. Throughput is member weight steps per second of the
whole call; ``loop`` is the training loop alone (each result's
``wall_time_s``). ``--rounds R`` measures every algorithm's baselines and
populations R times, interleaved, and gives the median of the rounds'
ratios, each round's population against that round's baselines: on a
shared machine one round's ratio moves by a fifth or more. ``--modes eager compiled`` also
trains each population with ``compile: true`` (the same pure step under
``torch.compile``; the whole call includes the compilation, also printed on
its own), against the same baselines: the configurations as they are
(eager), as ``parallel_exec.py`` ran each run before. ``--campaign`` times a whole
UCI-energy campaign (200 inits x 7 algorithms x 4,000 weight steps) through
``parallel_exec.py`` with ``--population-size``, against the per-run fan-out
estimated from ``--campaign-sample`` repetitions per algorithm (measured,
then scaled; the output says so).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import generators  # noqa: E402
import population  # noqa: E402
import train  # noqa: E402
from errors import CommandLine, at_least_one, exit_on_user_error  # noqa: E402

# The shared data root, as the tests use it, unless the user chose one (child processes inherit it).
os.environ.setdefault("HYPERGRAD_DATA", str(ROOT.parent / "shared" / "data"))

ALGORITHMS = ["Random", "Ours_LR_Momentum", "DiffThroughOpt"]
FULL_CAMPAIGN = 200  # initialisations per algorithm in the campaign
CAMPAIGN = ["Random", "Baydin", "Lorraine", "Ours_LR", "Ours_LR_Momentum", "Ours_HDLR_Momentum",
            "DiffThroughOpt"]
FASHION_FILES = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
                 "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}


def write_idx(path, array):
    """One file in the MNIST/idx format torchvision reads: magic (unsigned
    bytes, dimension count), the sizes big-endian, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fashion_data_root(scratch):
    """``(data_root, description)``: the real Fashion-MNIST files if present,
    else synthetic ones of the same shape under ``scratch``."""
    real = Path(os.environ["HYPERGRAD_DATA"])
    if all((real / "FashionMNIST" / "raw" / name).is_file() for name in FASHION_FILES):
        return str(real), "real Fashion-MNIST"
    raw = Path(scratch) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name, shape in FASHION_FILES.items():
        high = 10 if "labels" in name else 256
        write_idx(raw / name, generator.integers(0, high, size=shape))
    return str(scratch), "SYNTHETIC data of the Fashion-MNIST shape (real files absent)"


def workloads(scratch, chosen):
    table = {}
    if "uci" in chosen:
        table["UCI energy (8-50-1, full batch 614)"] = (["configs/uci_energy.yaml"], {}, "real data")
    if "fashion" in chosen:
        root, description = fashion_data_root(scratch)
        table["Fashion-MNIST shape (784-50-10, batch 50)"] = (
            ["configs/fashion_mnist.yaml"], {"data_root": root, "dataset.download": False}, description)
    return table


def stack(files, algorithm):
    return [str(ROOT / name) for name in files] + [str(ROOT / "configs" / f"{algorithm}.yaml")]


def member_overrides(count, common):
    """The fan-out's draws: one ``natural_sgd`` initialisation and seed per member."""
    return [{**draw, **common} for draw in generators.generate("natural_sgd", count, seed=0)]


def weight_steps(result):
    return result["network_weight_steps_done"]


def set_arguments(overrides):
    return [f"{key}={json.dumps(value) if isinstance(value, bool) else value}"
            for key, value in overrides.items()]


def child_environment(threads):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def separate_processes(config, overrides, scratch, threads):
    """Seconds and weight steps of one whole ``train.py`` process."""
    run_dir = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", *config, "--set",
                    *set_arguments(overrides), "-q", "--run-dir", str(run_dir)], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT, env=child_environment(threads))
    seconds = time.perf_counter() - started
    result = json.loads((run_dir / "results.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, weight_steps(result)


def population_process(config, count, common, scratch, threads):
    """Seconds and total member weight steps of one whole ``train.py
    --population N`` process: cold, like a separate process (start-up,
    imports, compilation, training, every member's logs). Its members are
    the generator's first ``count`` draws, the bench's own members."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", *config, "--population", str(count),
                    "--generator", "natural_sgd", "--seed", "0", "--set", *set_arguments(common),
                    "-q", "-l", str(folder), "-g", "population"], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT, env=child_environment(threads))
    seconds = time.perf_counter() - started
    results = [json.loads(path.read_text()) for path in folder.rglob("results.json")]
    shutil.rmtree(folder, ignore_errors=True)
    if len(results) != count:
        raise RuntimeError(f"train.py --population {count} wrote {len(results)} results")
    return seconds, sum(weight_steps(result) for result in results)


def in_process(config, overrides, scratch):
    """Seconds (whole call), loop seconds and weight steps of one ``train.main`` call."""
    run_dir = tempfile.mkdtemp(dir=scratch)
    started = time.perf_counter()
    result = train.main(config, overrides, run_dir=run_dir, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, result["wall_time_s"], weight_steps(result)


def population_call(config, members_overrides, scratch):
    """Seconds (whole call), loop seconds and total member weight steps of
    one ``population.main`` call, and how many members diverged."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    members = [{"overrides": overrides, "run_dir": str(folder / f"member_{index}"), "name": f"member_{index}"}
               for index, overrides in enumerate(members_overrides)]
    started = time.perf_counter()
    results = population.main(config, members, log_root=str(folder), progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    loop = max(result.get("wall_time_s", seconds) for result in results)
    compile_seconds = max(result.get("compile_time_s", 0.0) for result in results)
    diverged = sum(result["status"] != "finished" for result in results)
    return seconds, loop, compile_seconds, sum(weight_steps(result) for result in results), diverged


def label_of(n, mode):
    return f"N={n}" + (" compiled" if mode == "compiled" else "")


def measure_round(config, algorithm, overrides, baseline, common, arguments, scratch, first):
    """One round of one algorithm: its baselines, then each population
    in-process (after a warm-up population in the first round, as the
    in-process runs have a warm-up run) and as its own process. Returns
    ``(row, compile seconds, notes)``; ``row`` maps each column to member
    weight steps per second."""
    row, compile_times, notes = {}, {}, []
    timings = [separate_processes(config, baseline[k], scratch, arguments.threads)
               for k in range(arguments.processes)]
    row["separate processes"] = sum(s for _, s in timings) / sum(t for t, _ in timings)
    if first:
        in_process(config, overrides[0], scratch)  # warm-up: imports, first-call costs
    timings = [in_process(config, baseline[k], scratch) for k in range(arguments.processes)]
    row["in-process runs"] = sum(s for _, _, s in timings) / sum(t for t, _, _ in timings)
    row["in-process loop"] = sum(s for _, _, s in timings) / sum(l for _, l, _ in timings)
    for n, mode in [(n, mode) for n in arguments.population_sizes for mode in arguments.modes]:
        label = label_of(n, mode)
        compiled = {"compile": mode == "compiled"}
        if first:  # warm-up: this process's one-time imports (dynamo, inductor) and first calls
            population_call(config, [{**member, **compiled, "hyperparameter_steps": 1}
                                     for member in overrides[:2]], scratch)
        members = [{**member, **compiled} for member in overrides[:n]]
        seconds, loop, compile_seconds, member_steps, diverged = population_call(
            config, members, scratch)
        row[label] = member_steps / seconds
        row[f"{label} loop"] = member_steps / loop
        if mode == "compiled":
            compile_times[f"{algorithm} {label}"] = compile_seconds
        if diverged:
            notes.append(f"{algorithm} {label}: {diverged} member(s) diverged (frozen; counted "
                         f"with the steps they did)")
        if arguments.population_processes:
            seconds, member_steps = population_process(
                config, n, {**common, **compiled}, scratch, arguments.threads)
            row[f"{label} process"] = member_steps / seconds
    return row, compile_times, notes


def median(values):
    return float(np.median(values))


def bench_workload(label, files, common, description, arguments, scratch):
    print(f"\n## {label}: {description}")
    steps, baseline_steps = arguments.hyperparameter_steps, arguments.baseline_hyperparameter_steps
    arguments.population_sizes = [n for n in arguments.sizes if n <= arguments.max_size]
    common = {"hyperparameter_steps": steps, "device": "cpu", "log_interval": 100, **common}
    overrides = member_overrides(max(arguments.population_sizes + [arguments.processes]), common)
    baseline = [{**member, "hyperparameter_steps": baseline_steps or steps} for member in overrides]
    runnable = []
    for algorithm in arguments.algorithms:
        reason = population.refusal(stack(files, algorithm), overrides[0])
        if reason:
            print(f"  {algorithm}: population path unavailable: {reason}")
        else:
            runnable.append(algorithm)
    rounds = {algorithm: [] for algorithm in runnable}
    compile_times = {}
    for index in range(arguments.rounds):
        for algorithm in runnable:  # interleaved: each round's ratios are measured close in time
            row, compiled, notes = measure_round(stack(files, algorithm), algorithm, overrides,
                                                 baseline, common, arguments, scratch, index == 0)
            rounds[algorithm].append(row)
            for key, value in compiled.items():
                compile_times.setdefault(key, []).append(value)
            print(f"  round {index + 1} {algorithm:20s} " + "  ".join(
                f"{key} {value:,.0f}" for key, value in row.items()), flush=True)
            for note in notes:
                print(f"  {note}")
    print(f"  (member weight steps per second of the whole call or process; 'loop': the training "
          f"loop alone; 'process': the population as one whole `train.py --population N` process. "
          f"Populations: {steps} hyperparameter steps per member; separate processes and in-process "
          f"runs: {baseline_steps or steps}; {arguments.threads} thread(s) per process; ratios below "
          f"from whole calls, each round's population against the same round's baselines)")
    if compile_times:
        print("  'compiled': populations with compile: true (baselines as configured); seconds "
              "compiling, included in the whole call: " + ", ".join(
                  f"{key} {'/'.join(f'{v:.1f}' for v in values)}"
                  for key, values in compile_times.items()))
    labels = [label_of(n, mode) for n in arguments.population_sizes for mode in arguments.modes]
    for algorithm, rows in rounds.items():
        for label in labels:
            for column, name in ((label, "in-process population"),
                                 (f"{label} process", "population process")):
                if column in rows[0]:
                    print(f"  {algorithm} {label}, {name}: " + ratios_against_baselines(rows, column))
    if {"Random", "Ours_LR_Momentum"} <= set(rounds):
        ratios = [f"{label} {rate(rounds, 'Random', label) / rate(rounds, 'Ours_LR_Momentum', label):.2f}x"
                  for label in labels]
        print("  Ours_LR_Momentum / Random time ratio inside a population (median rates): "
              + ", ".join(ratios))


def ratios_against_baselines(rows, column):
    """``column``'s rate over each baseline, the median over rounds (and each round's)."""
    separate = [row[column] / row["separate processes"] for row in rows]
    single = [row[column] / row["in-process runs"] for row in rows]
    text = (f"{median(separate):.1f}x separate processes, {median(single):.1f}x in-process runs "
            f"(targets at N=64: 10x and 3x)")
    if len(rows) > 1:
        text += (f"; medians of {len(rows)} rounds, which gave "
                 f"{', '.join(f'{r:.1f}x' for r in separate)} and "
                 f"{', '.join(f'{r:.1f}x' for r in single)}")
    return text


def rate(rounds, algorithm, column):
    return median([row[column] for row in rounds[algorithm]])


def fanout_seconds(repetitions, population_size, workers, scratch, group):
    command = [sys.executable, str(ROOT / "parallel_exec.py"), "-c", str(ROOT / "configs" / "uci_energy.yaml"),
               "--algorithms", *CAMPAIGN, "--repetitions", str(repetitions), "--workers", str(workers),
               "-l", str(scratch), "-g", group, "--no-progress", "--set", "device=cpu"]
    if population_size:
        command += ["--population-size", str(population_size)]
    started = time.perf_counter()
    answer = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    summary = json.loads((Path(scratch) / group / "summary.json").read_text())
    return seconds, summary, answer.stderr.strip().splitlines()


def bench_campaign(arguments, scratch):
    reps, size, sample = arguments.campaign_repetitions, arguments.campaign_population_size, arguments.campaign_sample
    runs = reps * len(CAMPAIGN)
    print(f"\n## Whole UCI-energy campaign: {reps} natural_sgd inits x {len(CAMPAIGN)} algorithms "
          f"({runs} runs, 4,000 weight steps each), {arguments.workers} workers")
    seconds, summary, _ = fanout_seconds(sample, None, arguments.workers, scratch, "sample")
    estimate = seconds * reps / sample
    print(f"  without populations: {estimate / 60:.1f} min ESTIMATED from a measured sample of "
          f"{sample} repetitions per algorithm ({sample * len(CAMPAIGN)} runs in {seconds:.0f} s, "
          f"counts {summary['counts']}), scaled by {reps}/{sample}")
    seconds, summary, lines = fanout_seconds(reps, size, arguments.workers, scratch, "populations")
    print(f"  with --population-size {size}: {seconds / 60:.1f} min measured "
          f"(counts {summary['counts']}, {len(summary.get('populations', []))} populations); "
          f"{estimate / seconds:.1f}x faster; target under 20 min")
    for line in lines:
        if "not vectorised" in line:
            print(f"  {line}")
    failed = {}
    for line in summary["runs"]:
        if line["status"] == "failed":
            failed.setdefault(line["algorithm"], []).append(line["error"])
    for algorithm, errors in failed.items():
        print(f"  FAILED: {algorithm}: {len(errors)} run(s): {errors[0]}")
    if reps != FULL_CAMPAIGN:
        print(f"  scaled linearly to the {FULL_CAMPAIGN}-init campaign ({FULL_CAMPAIGN * len(CAMPAIGN)} runs), "
              f"ESTIMATES: without populations {estimate * FULL_CAMPAIGN / reps / 60:.0f} min, with "
              f"{seconds * FULL_CAMPAIGN / reps / 60:.0f} min (populations of {size} at most; larger "
              f"populations would do better per member than this linear scaling)")


@exit_on_user_error
def main():
    parser = CommandLine(prog="bench/population.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--max-size", type=int, default=1024, help="skip population sizes above this")
    parser.add_argument("--hyperparameter-steps", type=int, default=20,
                        help="per run (UCI energy and Fashion-MNIST configs: 10 weight steps each)")
    parser.add_argument("--baseline-hyperparameter-steps", type=int,
                        help="per separate process and in-process run (default: as populations); "
                             "400 is a whole UCI-energy run")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--workloads", nargs="*", default=["uci", "fashion"], choices=["uci", "fashion"],
                        help="none given: only --campaign")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (every path alike)")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="populations as configured (eager) and/or with compile: true; "
                             "separate and in-process runs stay as configured")
    parser.add_argument("--processes", type=int, default=2,
                        help="separate processes and in-process runs timed per algorithm")
    parser.add_argument("--rounds", type=at_least_one, default=1,
                        help="measure every algorithm's baselines and populations this many "
                             "times, interleaved; ratios are the rounds' medians")
    parser.add_argument("--population-processes", action="store_true",
                        help="also time each population as one whole `train.py --population N` "
                             "process (cold, as a separate process is)")
    parser.add_argument("--campaign", action="store_true", help="also time a whole campaign (long)")
    parser.add_argument("--campaign-repetitions", type=int, default=200)
    parser.add_argument("--campaign-population-size", type=int, default=100)
    parser.add_argument("--campaign-sample", type=int, default=4,
                        help="repetitions per algorithm timed without populations (then scaled)")
    parser.add_argument("--workers", type=int, default=2, help="parallel_exec.py workers for --campaign")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    print(f"bench/population.py: torch {torch.__version__}, {os.cpu_count()} CPU(s), "
          f"{arguments.threads} thread(s); command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as scratch:
        for label, (files, common, description) in workloads(scratch, arguments.workloads).items():
            bench_workload(label, files, common, description, arguments, scratch)
        if arguments.campaign:
            bench_campaign(arguments, scratch)


if __name__ == "__main__":
    main()
