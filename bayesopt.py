"""Bayesian optimisation of the initial SGD hyperparameters with Ax (the paper's baseline).

    python bayesopt.py -c configs/uci_energy.yaml configs/Random_Validation_BayesOpt.yaml \
        [--trials 30] [--initial 5] [--parallel N] [--workers N] [--executor local|slurm] \
        [--slurm slurm/uci.yaml] [--search search.yaml] [-g GROUP] [-l LOG_ROOT] [--set k=v ...]

Each trial is one full training run (``train.main``) with fixed
hyperparameters proposed by Ax's ``Client``; its objective is the final
validation loss (a diverged or non-finite run scores a finite penalty, so the
surrogate model stays well defined). The search space is the paper's: log10
learning rate in [-6, -1], log10 weight decay in [-7, -2], momentum in [0, 1]
(stored through the inverse sigmoid, as the configs store it); bounds and
budget can come from a YAML file (``--search``)::

    trials: 30
    initial: 5
    parallel: 4
    seed: 0
    parameters:
      network_weight.lr: [-6, -1]
      network_weight.weight_decay: [-7, -2]
      network_weight.momentum: {bounds: [0, 1], store: logit}

Trials run through the same executors as ``parallel_exec.py``. The Ax
experiment is saved (atomically) after every completed trial, in
``LOG_ROOT/GROUP/<dataset>/<algorithm>/ax_client.json``; running the same
command again resumes it: finished trials are never repeated, and trials that
were running when it stopped are run again in their own directory (resuming
from their checkpoint where there is one). The best configuration and its test
loss go to ``best.json`` there and to TensorBoard.
"""
import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

import config as config_module
import executors
import generators
import processes
import validate
from errors import UserError, exit_on_user_error
from registry import closest

# Ax's dependencies warn about deprecated torch APIs when imported; the warning
# would print before every one-line error and every summary.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

DEFAULT_SEARCH = {
    "trials": 30,
    "initial": 5,
    "parallel": None,
    "seed": 0,
    "parameters": {
        "network_weight.lr": {"bounds": [-6.0, -1.0]},
        "network_weight.weight_decay": {"bounds": [-7.0, -2.0]},
        "network_weight.momentum": {"bounds": [0.0, 1.0], "store": "logit"},
    },
}
STORES = ("as_is", "logit")
STATE_FILE = "ax_client.json"
BEST_FILE = "best.json"
OBJECTIVE = "validation_loss"


def build_parser():
    parser = executors.CommandLine(prog="bayesopt.py", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", nargs="+", required=True, help="config files, stacked in order")
    parser.add_argument("--trials", type=int, help="total trials (default 30)")
    parser.add_argument("--initial", type=int, help="quasi-random trials before the model (default 5)")
    parser.add_argument("--parallel", type=int, help="trials in flight at once (default: workers)")
    parser.add_argument("--seed", type=int, help="seed of Ax's generation (default 0)")
    parser.add_argument("--search", help="YAML with trials/initial/parallel/seed/parameters")
    parser.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    parser.add_argument("--executor", choices=executors.EXECUTORS, default="local")
    parser.add_argument("--slurm", help="SLURM settings YAML (slurm/*.yaml)")
    parser.add_argument("-g", "--group", default="bayesopt", help="group directory name")
    parser.add_argument("-l", "--log-root", dest="log_root", default="runs", help="root of run directories")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every trial")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def read_search(path, arguments):
    """Search space and budget: command line over ``--search`` YAML over the paper's."""
    search = json.loads(json.dumps(DEFAULT_SEARCH))
    sources = {}
    if path:
        data = config_module.read_yaml(path, "search file")
        sources = {key: f"{path}: {key}" for key in data}
        for key in data:
            if key not in DEFAULT_SEARCH:
                raise UserError(f"{path}: unknown key '{key}'{closest(key, DEFAULT_SEARCH)}; "
                                f"valid: {', '.join(DEFAULT_SEARCH)}")
        search.update(data)
    for key in ("trials", "initial", "parallel", "seed"):
        if getattr(arguments, key) is not None:
            search[key] = getattr(arguments, key)
            sources[key] = f"--{key}"
    where = path or "search"
    for key, lowest in (("trials", 1), ("initial", 1), ("seed", 0), ("parallel", 1)):
        value = search[key]
        if key == "parallel" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise UserError(f"{sources.get(key, key)}: must be an integer >= {lowest}, got {value!r}")
    if arguments.workers is not None and arguments.workers < 1:
        raise UserError(f"--workers: must be an integer >= 1, got {arguments.workers}")
    if not isinstance(search["parameters"], dict):
        raise UserError(f"{where}: parameters: must be a mapping of dotted config keys to bounds, "
                        f"got {search['parameters']!r}")
    search["parameters"] = {key: parse_parameter(key, value, where)
                            for key, value in (search["parameters"] or {}).items()}
    if not search["parameters"]:
        raise UserError(f"{where}: parameters: give at least one dotted key with bounds")
    return search


def parse_parameter(key, value, where):
    """``[low, high]`` or ``{bounds: [low, high], store: as_is|logit}``."""
    if not isinstance(value, (list, dict)):
        raise UserError(f"{where}: parameters.{key}: must be [low, high] or {{bounds: [low, high], "
                        f"store: as_is|logit}}, got {value!r}")
    spec = {"bounds": value} if isinstance(value, list) else dict(value)
    for option in spec:
        if option not in ("bounds", "store"):
            raise UserError(f"{where}: parameters.{key}: unknown option {option!r}; valid: bounds, store")
    bounds, store = spec.get("bounds"), spec.get("store", "as_is")
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in bounds) or not bounds[0] < bounds[1]):
        raise UserError(f"{where}: parameters.{key}: bounds must be [low, high] with low < high, got {bounds!r}")
    if store not in STORES:
        raise UserError(f"{where}: parameters.{key}: store must be one of {', '.join(STORES)}, got {store!r}")
    if store == "logit" and not 0 <= bounds[0] < bounds[1] <= 1:
        raise UserError(f"{where}: parameters.{key}: logit-stored bounds must lie in [0, 1]")
    return {"bounds": [float(bounds[0]), float(bounds[1])], "store": store}


def ax_name(key):
    """Ax parameter name for a dotted config key (``network_weight.lr`` -> ``network_weight__lr``)."""
    return key.replace(".", "__")


def overrides_for(parameters, search):
    """An Ax parameterization as config overrides, in the configs' stored space."""
    overrides = {}
    for key, spec in search["parameters"].items():
        value = float(parameters[ax_name(key)])
        overrides[key] = generators.logit(value) if spec["store"] == "logit" else value
    return overrides


def quiet_ax():
    """Ax logs every trial at INFO; the progress bar and summary say enough."""
    for name in list(logging.root.manager.loggerDict):
        if name == "ax" or name.startswith("ax."):
            logging.getLogger(name).setLevel(logging.WARNING)


def new_client(search, name):
    from ax import Client, RangeParameterConfig

    quiet_ax()

    client = Client(random_seed=search["seed"])
    client.configure_experiment(
        parameters=[RangeParameterConfig(name=ax_name(key), parameter_type="float",
                                         bounds=tuple(spec["bounds"]))
                    for key, spec in search["parameters"].items()],
        name=name)
    client.configure_optimization(objective=f"-{OBJECTIVE}")
    client.configure_generation_strategy(initialization_budget=search["initial"],
                                         initialization_random_seed=search["seed"])
    return client


def save_client(client, path):
    """Ax writes in place; write beside the file and replace it, so a kill never corrupts it."""
    temporary = path.with_name(f".{path.name}.tmp")
    client.save_to_json_file(str(temporary))
    temporary.replace(path)


def load_or_create(state_path, search, name):
    from ax import Client

    quiet_ax()

    if not state_path.is_file():
        return new_client(search, name)
    try:
        client = Client.load_from_json_file(str(state_path))
    except Exception as error:  # noqa: BLE001 -- Ax raises many kinds for a broken file
        raise UserError(f"{state_path}: not a readable Ax experiment ({type(error).__name__}); "
                        f"use another -g GROUP or remove the file") from None
    saved = {parameter for parameter in client._experiment.search_space.parameters}
    wanted = {ax_name(key) for key in search["parameters"]}
    if saved != wanted:
        raise UserError(f"{state_path}: saved experiment searches {sorted(saved)}, this command "
                        f"{sorted(wanted)}; use another -g GROUP or remove the file")
    return client


def check_search_keys(stack, set_overrides, search, path):
    """Every searched key is a valid config key, at both ends of its range
    (checked like any other override, blamed on the search file)."""
    source = f"{path}: parameters" if path else "search parameters"
    for end in (0, 1):
        trial = {key: generators.logit(spec["bounds"][end]) if spec["store"] == "logit"
                 else spec["bounds"][end] for key, spec in search["parameters"].items()}
        overrides = [(key, value, source) for key, value in trial.items()]
        validate.check(config_module.load(stack, overrides + list(set_overrides.items())))


def trial_statuses(client):
    """``{trial index: status name}`` of the saved experiment."""
    return {index: trial.status.name for index, trial in client._experiment.trials.items()}


class Optimisation:
    """One BO campaign: the Ax client, its trials' jobs, and the bookkeeping."""

    def __init__(self, options, search):
        self.search = search
        self.stack = [str(Path(path).resolve()) for path in options.config]
        self.set_overrides = dict(config_module.normalise_overrides(options.set))
        resolved = config_module.load(self.stack, self.set_overrides)
        validate.check(resolved)
        check_search_keys(self.stack, self.set_overrides, search, options.search)
        self.algorithm = resolved["algorithm"]
        self.penalty = float(resolved["divergence_penalty"])
        log_root = Path(options.log_root)
        if log_root.exists() and not log_root.is_dir():
            raise UserError(f"-l {log_root}: not a directory")
        self.directory = (log_root / options.group / Path(self.stack[0]).stem
                          / self.algorithm).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state_path = self.directory / STATE_FILE
        self.client = load_or_create(self.state_path, search, f"{options.group}-{self.algorithm}")
        self.executor_kind, self.options = options.executor, options
        self.started = time.time()

    def job(self, index, parameters):
        overrides = {**overrides_for(parameters, self.search), **self.set_overrides}
        return {"config": self.stack, "overrides": overrides, "run_dir": str(self.directory / f"trial_{index}"),
                "name": f"trial_{index}", "group": self.options.group, "algorithm": self.algorithm}

    def objective(self, result):
        """Final validation loss; diverged, failed or non-finite runs get the finite penalty."""
        value = result.get("objective")
        if result.get("status") != "finished" or not isinstance(value, (int, float)) or not math.isfinite(value):
            return self.penalty
        return float(value)

    def record(self, index, result, writer):
        """Tell Ax, save the experiment, log to TensorBoard."""
        if result.get("status") == executors.FAILED:
            self.client.mark_trial_failed(index, failed_reason=str(result.get("error"))[:300])
        else:
            self.client.complete_trial(index, {OBJECTIVE: self.objective(result)})
        save_client(self.client, self.state_path)
        if result.get("status") != executors.FAILED:
            writer.add_scalar("BayesOpt/Objective", self.objective(result), index)
            best = min(self.completed_objectives().values())
            writer.add_scalar("BayesOpt/Best_Objective", best, len(self.completed_objectives()))
            writer.flush()

    def completed_objectives(self):
        data = {}
        for index, trial in self.client._experiment.trials.items():
            if trial.status.name == "COMPLETED":
                frame = self.client._experiment.lookup_data(trial_indices=[index]).df
                if len(frame):
                    data[index] = float(frame["mean"].iloc[0])
        return data

    def done_count(self):
        return sum(status in ("COMPLETED", "FAILED") for status in trial_statuses(self.client).values())

    def run(self):
        """Ask, run, tell until ``trials`` trials are done; returns the best summary."""
        from torch.utils.tensorboard import SummaryWriter

        budget = self.search["trials"]
        parallel = self.search["parallel"] or self.options.workers or 1
        writer = SummaryWriter(str(self.directory / "tensorboard"))
        bar = tqdm(total=budget, initial=min(self.done_count(), budget), desc="trials", unit="trial",
                   disable=not self.options.progress, file=sys.stderr)
        executor = None
        pending = {}  # handle -> trial index
        try:
            interrupted = {index: self.client._experiment.trials[index].arm.parameters
                           for index, status in trial_statuses(self.client).items() if status == "RUNNING"}
            while self.done_count() < budget:
                free = min(parallel, budget - self.done_count()) - len(pending)
                proposals = dict(list(interrupted.items())[:max(free, 0)])
                for index in proposals:
                    interrupted.pop(index)
                free -= len(proposals)
                if free > 0 and not interrupted:
                    proposals.update(self.client.get_next_trials(max_trials=free))
                    save_client(self.client, self.state_path)
                executor = executor or executors.make_executor(
                    self.executor_kind, self.directory / "slurm_logs", self.options.slurm, self.options.workers)
                pending.update(self.submit(executor, proposals))
                if not pending:
                    raise UserError("Ax proposed no new trial and none is running; "
                                    "raise --trials or check the search space")
                for handle, result in executor.wait_any(list(pending)):
                    self.record(pending.pop(handle), result, writer)
                    bar.update(1)
        finally:
            bar.close()
            if executor is not None:
                executor.shutdown()
        best = self.write_best(writer)
        writer.close()
        return best

    def submit(self, executor, proposals):
        """Start a run per proposal; a trial whose run already ended (killed
        before Ax was told) is recorded from its results without running again."""
        handles = {}
        for index, parameters in proposals.items():
            job = self.job(index, parameters)
            done = finished_result(job["run_dir"])
            if done is not None:
                handles[executors.finished(done)] = index
                continue
            active = executors.active_slurm_job(job["run_dir"])
            if active and hasattr(executor, "attach"):  # still on SLURM from the killed invocation
                handles[executor.attach(active)] = index
                continue
            [handle] = executor.map(executors.TrainingRun(), [job], label=self.algorithm)
            handles[handle] = index
        return handles

    def write_best(self, writer):
        """The best trial (lowest observed objective), its test loss, into best.json and TensorBoard."""
        objectives = self.completed_objectives()
        if not objectives:
            raise UserError(f"no trial of {self.directory} completed; see trial_*/error.txt")
        index = min(objectives, key=objectives.get)
        results = finished_result(self.directory / f"trial_{index}") or {}
        parameters = self.client._experiment.trials[index].arm.parameters
        trials = [finished_result(self.directory / f"trial_{k}") or {} for k in objectives]
        best = {
            "algorithm": self.algorithm, "dataset": results.get("dataset"), "trial": index,
            "parameters": {key: float(parameters[ax_name(key)]) for key in self.search["parameters"]},
            "overrides": overrides_for(parameters, self.search),
            "hyperparameters": results.get("hyperparameters"),
            "objective": objectives[index], "final": results.get("final", {}),
            "run_dir": str(self.directory / f"trial_{index}"),
            "trials": len(trial_statuses(self.client)), "completed_trials": len(objectives),
            "total_training_time_s": sum(float(r.get("wall_time_s", 0.0)) for r in trials),
            "wall_time_s": time.time() - self.started,
        }
        executors.write_atomically(self.directory / BEST_FILE, json.dumps(best, indent=2))
        for tag, value in best["final"].items():
            writer.add_scalar(f"BayesOpt/Best/{tag}", value, best["completed_trials"])
        writer.add_scalar("BayesOpt/Best/Objective", best["objective"], best["completed_trials"])
        return best


def finished_result(run_dir):
    """A run's saved results when it ended (finished or diverged), else None."""
    try:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") in ("finished", "diverged") else None


@exit_on_user_error
def main(argv=None):
    arguments = build_parser().parse_args(argv)
    search = read_search(arguments.search, arguments)
    optimisation = Optimisation(arguments, search)
    note = (lambda: print(f"{optimisation.directory}: another bayesopt.py is running this campaign; "
                          f"waiting for it", file=sys.stderr, flush=True)) if arguments.progress else None
    with processes.run_directory_lock(optimisation.directory, on_wait=note):
        best = optimisation.run()
    test = best["final"].get("Loss/Test")
    print(f"best of {best['completed_trials']} trials: trial {best['trial']} "
          f"{json.dumps(best['parameters'])} validation loss {best['objective']:.6g}, "
          f"test loss {test if test is None else format(test, '.6g')}; "
          f"written to {Path(best['run_dir']).parent / BEST_FILE}", file=sys.stderr)
    return best


if __name__ == "__main__":
    main()
    sys.exit(0)
