"""Fan out training runs: algorithms x repetitions, locally or on SLURM.

    python parallel_exec.py -c configs/uci_energy.yaml \
        --algorithms Random Lorraine Ours_LR_Momentum --repetitions 50 \
        [--generator natural_sgd|iteration_id|from_directory:DIR] [--seed 0] \
        [--workers N] [--executor local|slurm] [--slurm slurm/cifar10.yaml] \
        [-g GROUP] [-l LOG_ROOT] [--set key=value ...] [--campaign campaign.yaml] \
        [--population-size M]

Every repetition's override (one random SGD initialisation for
``natural_sgd``) is shared by all algorithms, so they start from the same
points. Each run has a fixed directory ``LOG_ROOT/GROUP/<dataset>/<algorithm>/rep_<k>``;
a run whose ``results.json`` says finished or diverged is skipped, so running
the same command again resumes an interrupted fan-out (and on SLURM a
preempted job resumes from its checkpoint in that directory). A failed run is
recorded (``error.txt`` in its directory, and the summary) and the rest go on.

``--population-size M`` packs each algorithm's pending runs into populations
of at most M members, each trained as one vectorised computation in one
worker process or SLURM array task (``population.main``). The run
directories, results and summary are the same as without it; skip-finished
and resume stay per member. An algorithm the vectorised path cannot take
(``population.refusal`` gives the reason) runs one process per run, as
without the option, and the fan-out says so in one line.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

import config as config_module
import executors
import generators
import validate
from errors import UserError, exit_on_user_error
from registry import closest

REPOSITORY = Path(__file__).resolve().parent
DONE = ("finished", "diverged")
CAMPAIGN_KEYS = ("config", "algorithms", "repetitions", "generator", "seed", "workers", "executor",
                 "slurm", "group", "log_root", "set", "algorithm_dir", "population_size")


def build_parser():
    parser = executors.CommandLine(prog="parallel_exec.py", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", nargs="+", help="dataset/model config files, stacked in order")
    parser.add_argument("--algorithms", nargs="+", help="algorithm names: configs/<Name>.yaml")
    parser.add_argument("--repetitions", type=int, help="initialisations per algorithm")
    parser.add_argument("--generator", help="natural_sgd (default), iteration_id or from_directory:DIR")
    parser.add_argument("--seed", type=int, help="seed of the generator (default 0)")
    parser.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    parser.add_argument("--executor", choices=executors.EXECUTORS, help="local (default) or slurm")
    parser.add_argument("--slurm", help="SLURM settings YAML (slurm/*.yaml)")
    parser.add_argument("-g", "--group", help="group directory name (default: fanout)")
    parser.add_argument("-l", "--log-root", dest="log_root", help="root of run directories (default: runs)")
    parser.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                        help="overrides applied to every run, after the generator's")
    parser.add_argument("--algorithm-dir", dest="algorithm_dir", help="where <Name>.yaml live (default: configs/)")
    parser.add_argument("--population-size", dest="population_size", type=int, metavar="M",
                        help="train each algorithm's runs as vectorised populations of at most M "
                             "members per job (default: one process per run)")
    parser.add_argument("--campaign", help="YAML whose keys give defaults for these options")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _names(value):
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(item, str) for item in value))


def _count(lowest):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= lowest


# campaign key -> (check, what it must be); null means "the default" where allowed.
CAMPAIGN_TYPES = {
    "config": (_names, "a file name or a list of them"),
    "algorithms": (_names, "an algorithm name or a list of them"),
    "repetitions": (lambda v: v is None or _count(1)(v), "an integer >= 1"),
    "generator": (lambda v: isinstance(v, (str, dict)), "a name or a mapping with 'class'"),
    "seed": (_count(0), "an integer >= 0"),
    "workers": (lambda v: v is None or _count(1)(v), "an integer >= 1"),
    "executor": (lambda v: v in executors.EXECUTORS, f"one of {', '.join(executors.EXECUTORS)}"),
    "slurm": (lambda v: v is None or isinstance(v, (str, dict)), "a SLURM settings file or mapping"),
    "group": (lambda v: isinstance(v, str) and bool(v), "a directory name"),
    "log_root": (lambda v: isinstance(v, str) and bool(v), "a directory"),
    "set": (lambda v: isinstance(v, dict) or (isinstance(v, list) and all(isinstance(i, str) for i in v)),
            "a mapping of dotted keys to values, or a list of key=value"),
    "algorithm_dir": (lambda v: isinstance(v, str) and bool(v), "a directory"),
    "population_size": (lambda v: v is None or _count(1)(v), "an integer >= 1"),
}
# The command-line flag of each option, for messages.
FLAGS = {"config": "-c", "log_root": "-l", "algorithm_dir": "--algorithm-dir"}


def read_campaign(path):
    """Defaults for the command-line options from a campaign YAML file, type-checked."""
    data = config_module.read_yaml(path, "campaign file") if path else {}
    for key, value in data.items():
        if key not in CAMPAIGN_KEYS:
            raise UserError(f"{path}: unknown campaign key '{key}'{closest(key, CAMPAIGN_KEYS)}; "
                            f"valid: {', '.join(CAMPAIGN_KEYS)}")
        check, expected = CAMPAIGN_TYPES.get(key, (lambda _: True, ""))
        if not check(value):
            raise UserError(f"{path}: {key}: must be {expected}, got {value!r}")
    return data


def flag(key):
    return FLAGS.get(key, f"--{key.replace('_', '-')}")


def resolve_options(arguments):
    """Command line over campaign file over defaults, into one plain dict."""
    campaign = read_campaign(arguments.campaign)
    defaults = {"generator": "natural_sgd", "seed": 0, "executor": "local", "group": "fanout",
                "log_root": "runs", "set": [], "algorithm_dir": str(REPOSITORY / "configs"),
                "workers": None, "slurm": None, "repetitions": None, "population_size": None}
    options = {**defaults, **campaign}
    # Where each option came from: a flag, or the campaign file.
    options["sources"] = {key: str(arguments.campaign) for key in campaign}
    for key in CAMPAIGN_KEYS:
        value = getattr(arguments, key, None)
        if value is not None:
            options[key] = value
            options["sources"][key] = flag(key)
    options["progress"] = arguments.progress
    if not options.get("config"):
        raise UserError("-c: no config given: -c configs/<dataset>.yaml")
    if not options.get("algorithms"):
        raise UserError("--algorithms: no algorithms given: --algorithms Random Lorraine ...")
    for key in ("workers", "seed", "population_size"):
        check, expected = CAMPAIGN_TYPES[key]
        if not check(options[key]):
            raise UserError(f"{where(options, key)}: must be {expected}, got {options[key]!r}")
    for key in ("config", "algorithms"):
        if isinstance(options[key], str):
            options[key] = [options[key]]
    options["set"] = set_overrides(options["set"], options["sources"].get("set", "--set"))
    log_root = Path(options["log_root"])
    if log_root.exists() and not log_root.is_dir():
        raise UserError(f"{where(options, 'log_root')} {log_root}: not a directory")
    return options


def where(options, key):
    """``campaign.yaml: key`` or the flag, for messages about an option."""
    source = options.get("sources", {}).get(key, flag(key))
    return f"{source}: {key}" if source.endswith((".yaml", ".yml")) else source


def set_overrides(value, source):
    """``set`` as ``(key, value, source)`` triples, so a bad key is blamed on
    the campaign file or on ``--set``."""
    items = value.items() if isinstance(value, dict) else config_module.normalise_overrides(value)
    label = source if source == "--set" else f"{source}: set"
    return [(key, item, label) for key, item in items]


def algorithm_file(name, directory, source="--algorithms"):
    """``configs/<Name>.yaml``; an unknown name lists the closest and the valid ones."""
    folder = Path(directory)
    path = folder / f"{name}.yaml"
    if path.is_file():
        return path.resolve()
    known = sorted(p.stem for p in folder.glob("*.yaml") if "algorithm" in config_module.read_yaml(p))
    raise UserError(f"{source}: unknown algorithm '{name}'{closest(name, known)}: no {path}; "
                    f"valid: {', '.join(known) or '(none)'}")


def dataset_name(config_paths):
    """The directory level for the dataset: the first config file's name (``uci_energy``)."""
    return Path(config_paths[0]).stem


def plan(options):
    """Every run as a job dict, in algorithm-major order, checked before anything starts."""
    config_paths = [str(Path(path).resolve()) for path in options["config"]]
    for path in config_paths:
        config_module.read_yaml(path)  # missing, binary or malformed: one line now
    triples = options["set"] if options["set"] and isinstance(options["set"][0], tuple) else \
        set_overrides(options["set"], "--set")
    set_values = {key: value for key, value, _ in triples}
    repetitions = generators.generate(options["generator"], options["repetitions"], options["seed"],
                                      where=where(options, "generator"))
    group_dir = Path(options["log_root"]) / options["group"] / dataset_name(config_paths)
    jobs = []
    for number, algorithm in enumerate(options["algorithms"]):
        stack = config_paths + [str(algorithm_file(algorithm, options["algorithm_dir"],
                                                   where(options, "algorithms")))]
        for index, generated in enumerate(repetitions):
            overrides = {**generated, **set_values}
            if index == 0 or number == 0:  # bad keys and values fail now, not in 200 workers
                source = getattr(generated, "source", None) or "generator"
                validate.check(config_module.load(stack, [(key, value, source) for key, value
                                                          in generated.items()] + triples))
            jobs.append({"config": stack, "overrides": overrides, "algorithm": algorithm,
                         "repetition": index, "group": options["group"],
                         "name": f"{algorithm}-rep_{index}",
                         "run_dir": str((group_dir / algorithm / f"rep_{index}").resolve())})
    return jobs


finished_result = executors.finished_result


def add_slurm_checkpointing(jobs, options):
    """On SLURM, make runs checkpoint (so preemption loses little) unless the
    user chose ``checkpoint_every`` already."""
    settings = executors.read_slurm_config(options["slurm"])
    every = settings.get("checkpoint_every")
    if not every:
        return
    for job in jobs:
        job["overrides"].setdefault("checkpoint_every", int(every))


def split_evenly(jobs, size):
    """``jobs`` in consecutive groups of at most ``size``, as equal as possible
    (200 runs at ``size`` 64: 50, 50, 50, 50, not 64, 64, 64, 8), so the
    populations of one algorithm take about the same time."""
    count = math.ceil(len(jobs) / size)
    base, extra = divmod(len(jobs), count)
    groups, start = [], 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        groups.append(jobs[start:end])
        start = end
    return groups


def pack(pending, size):
    """Each algorithm's pending runs as population jobs of at most ``size``
    members; runs the vectorised path refuses stay single-run jobs.

    Returns ``(jobs, fallbacks)``: ``jobs`` mixes population jobs (a
    ``members`` list of the single-run jobs they hold) and single-run jobs,
    algorithm by algorithm; ``fallbacks`` maps an algorithm to the reason its
    runs (or some of them) go one process per run. Members keep the overrides,
    names and run directories the per-run fan-out gives them.
    """
    import population  # torch: imported only when populations are asked for
    jobs, fallbacks = [], {}
    for algorithm in dict.fromkeys(job["algorithm"] for job in pending):
        batch = [job for job in pending if job["algorithm"] == algorithm]
        refusals = {}
        for job in batch:  # members differ in override values; check each distinct key set once
            keys = frozenset(job["overrides"])
            if keys not in refusals:
                refusals[keys] = population.refusal(job["config"], job["overrides"])
        vectorised = [job for job in batch if refusals[frozenset(job["overrides"])] is None]
        alone = [job for job in batch if refusals[frozenset(job["overrides"])] is not None]
        if alone:
            reason = next(refusals[frozenset(job["overrides"])] for job in alone)
            fallbacks[algorithm] = {"runs": len(alone), "reason": reason}
        # Runs given different override keys (``from_directory`` files) never share a population.
        alike = {}
        for job in vectorised:
            alike.setdefault(frozenset(job["overrides"]), []).append(job)
        populations = [members for same in alike.values() for members in split_evenly(same, size)]
        for index, members in enumerate(populations):
            jobs.append({"algorithm": algorithm, "population": index, "config": members[0]["config"],
                         "group": members[0]["group"], "name": f"{algorithm}-population_{index}",
                         "members": members})
        jobs.extend(alone)
    return jobs, fallbacks


def member_spec(job):
    """What ``population.main`` needs of one member."""
    return {"overrides": job["overrides"], "run_dir": job["run_dir"], "name": job["name"]}


def launch(executor, jobs):
    """Submit the pending jobs, one batch (one SLURM array) per algorithm, and
    one more for its populations. Returns the handles and, for each, the list
    of single-run jobs it answers for and whether it is a population."""
    handles, owners = [], []
    for algorithm in dict.fromkeys(job["algorithm"] for job in jobs):
        populations = [job for job in jobs if job["algorithm"] == algorithm and "members" in job]
        batch = [job for job in jobs if job["algorithm"] == algorithm and "members" not in job]
        if populations:
            payloads = [{**job, "members": [member_spec(member) for member in job["members"]]}
                        for job in populations]
            handles.extend(executor.map(executors.PopulationRun(), payloads, label=algorithm))
            owners.extend((job["members"], True) for job in populations)
        if batch:
            handles.extend(executor.map(executors.TrainingRun(), batch, label=algorithm))
            owners.extend(([job], False) for job in batch)
    return handles, owners


def member_results(members, result, population):
    """One result per member job from what a handle returned: a population's
    list (matched by run directory), a single run's dict, or one failure for
    a whole population whose process or SLURM task died (then recorded in
    each member's ``error.txt``)."""
    if isinstance(result, list):
        by_dir = {str(item.get("run_dir")): item for item in result if isinstance(item, dict)}
        if all(job["run_dir"] in by_dir for job in members):
            return [by_dir[job["run_dir"]] for job in members]
        if len(result) == len(members):
            return result
        result = {"status": executors.FAILED,
                  "error": f"population returned {len(result)} results for {len(members)} runs"}
    result = dict(result or {})
    if not population:
        return [result]
    if result.get("status", executors.FAILED) == executors.FAILED:
        for job in members:
            executors.record_failure(job["run_dir"], f"population failed: {result.get('error')}\n")
    return [{**result, "run_dir": job["run_dir"]} for job in members]


def collect(executor, handles, owners, records, bar):
    """Wait for every handle, recording results (one per run) as they arrive."""
    for index, result in executor.as_completed(handles):
        members, population = owners[index]
        for job, outcome in zip(members, member_results(members, result, population)):
            outcome = dict(outcome or {})
            if outcome.get("run_dir") is None:
                outcome["run_dir"] = job["run_dir"]
            records.append(record(job, outcome))
        bar.update(len(members))
        job = members[0]
        where = f"population of {len(members)}" if population else f"rep_{job['repetition']}"
        bar.set_postfix_str(f"{job['algorithm']} {where}: {outcome.get('status')}")


def record(job, result, skipped=False):
    """One summary line per run."""
    return {"algorithm": job["algorithm"], "repetition": job["repetition"], "run_dir": job["run_dir"],
            "status": result.get("status", executors.FAILED), "objective": result.get("objective"),
            "error": result.get("error"), "skipped": skipped}


def write_summary(path, summary):
    path.parent.mkdir(parents=True, exist_ok=True)
    executors.write_atomically(path, json.dumps(summary, indent=2))


def print_summary(summary, stream=sys.stderr):
    counts = summary["counts"]
    running = f", {counts['running']} still running on SLURM" if counts.get("running") else ""
    print(f"{summary['total']} runs: {counts.get('finished', 0)} finished, "
          f"{counts.get('diverged', 0)} diverged, {counts.get('failed', 0)} failed{running} "
          f"({summary['skipped']} already done, {summary['launched']} launched, "
          f"{summary['reattached']} already on SLURM) "
          f"in {summary['wall_time_s']:.1f} s; logs: {summary['group_dir']}", file=stream)
    for line in summary["runs"]:
        if line["status"] == executors.FAILED:
            print(f"  failed: {line['algorithm']} rep_{line['repetition']}: {line['error']} "
                  f"(see {line['run_dir']}/error.txt)", file=stream)


def run(options):
    """Plan, skip what is done, execute the rest, summarise. Returns the summary dict."""
    started = time.time()
    jobs = plan(options)
    group_dir = Path(options["log_root"]) / options["group"]
    if options["executor"] == "slurm":
        add_slurm_checkpointing(jobs, options)
    records, pending, attached = [], [], {}
    for job in jobs:
        done = finished_result(job["run_dir"])
        active = executors.active_slurm_job(job["run_dir"]) if not done else None
        if done:
            records.append(record(job, done, skipped=True))
        elif active and options["executor"] == "slurm":  # an earlier submission still on SLURM:
            attached.setdefault(active, []).append(job)   # wait for it, never submit it twice
        elif active:
            records.append(record(job, {"status": "running", "error": f"SLURM job {active}"}, skipped=True))
        else:
            pending.append(job)
    waiting = len(pending) + sum(len(members) for members in attached.values())
    units, fallbacks = pending, {}
    if options.get("population_size") and pending:
        units, fallbacks = pack(pending, options.get("population_size"))
        for algorithm, fallback in fallbacks.items():
            print(f"{algorithm}: {fallback['runs']} run(s) one process each, not vectorised: "
                  f"{fallback['reason']}", file=sys.stderr)
    bar = tqdm(total=len(jobs), initial=len(jobs) - waiting, desc="runs", unit="run",
               disable=not options["progress"], file=sys.stderr)
    if waiting:
        workers = options["workers"]
        if options.get("population_size") and options["executor"] == "local":
            # Fewer populations than workers: give each population more threads.
            workers = min(int(workers or os.cpu_count() or 1), max(1, len(units)))
        executor = executors.make_executor(options["executor"], group_dir / "slurm_logs",
                                           options["slurm"], workers)
        handles, owners = launch(executor, units)
        for job_id, members in attached.items():
            handles.append(executor.attach(job_id))
            owners.append((members, len(members) > 1))  # members sharing a job: a population
        try:
            collect(executor, handles, owners, records, bar)
        except KeyboardInterrupt:
            cancel(executor, handles)
            raise
        finally:
            executor.shutdown()
    bar.close()
    counts = {}
    for line in records:
        counts[line["status"]] = counts.get(line["status"], 0) + 1
    summary = {"total": len(jobs), "skipped": len(jobs) - waiting, "launched": len(pending),
               "reattached": waiting - len(pending),
               "counts": counts, "wall_time_s": time.time() - started,
               "group_dir": str(group_dir.resolve()),
               "runs": sorted(records, key=lambda line: (line["algorithm"], line["repetition"]))}
    if options.get("population_size"):
        summary["population_size"] = options.get("population_size")
        summary["populations"] = [{"algorithm": job["algorithm"], "population": job["population"],
                                   "repetitions": [member["repetition"] for member in job["members"]]}
                                  for job in units if "members" in job]
        summary["not_vectorised"] = fallbacks
    write_summary(group_dir / "summary.json", summary)
    return summary


def cancel(executor, handles):
    """On Ctrl-C, cancel submitted SLURM jobs so a re-run resumes them cleanly."""
    for handle in handles:
        if hasattr(handle, "cancel") and hasattr(handle, "job_id"):
            try:
                handle.cancel(check=False)
            except Exception:  # noqa: BLE001 -- best effort on the way out
                pass


@exit_on_user_error
def main(argv=None):
    options = resolve_options(build_parser().parse_args(argv))
    summary = run(options)
    print_summary(summary)
    return 1 if summary["counts"].get(executors.FAILED) else 0


if __name__ == "__main__":
    sys.exit(main())
