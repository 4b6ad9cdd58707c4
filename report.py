"""Turn a directory of runs into the paper's comparison: tables and plots.

    python report.py RUNS_DIR [--metric Unnormalised_Loss/Test] [--no-plots]

Reads every ``results.json`` under RUNS_DIR (as written by ``train.main``,
``parallel_exec.py`` and ``bayesopt.py``) and the TensorBoard logs beside
them (with TensorBoard's own ``EventAccumulator``), and writes into RUNS_DIR:

- ``report.csv``: one row per dataset and algorithm -- runs, diverged, median,
  mean +- standard error and best final metric, median training-loop time and
  its ratio to Random's; Bayesian optimisation counted by campaigns, trials
  and total training time, its metric being the best trial's;
- ``ecdf_<dataset>.png``: empirical CDF of the final metric per algorithm (the
  paper's main figure; diverged runs never arrive, so their curve stops short of 1);
- ``trajectories_<dataset>.png``: median metric against weight step, with the
  median learning rate, weight decay and momentum below it;
- ``paper_table.csv`` and the first section of ``report.md``: the paper's
  table -- per dataset and algorithm, runs, diverged, median and mean +-
  standard error of the final test loss (normalised, and for UCI also the
  unnormalised MSE), training cost relative to Random;
- ``report.md`` with the tables and both plots.

Diverged runs count as +inf: they move the median and the CDF, and are left
out of the mean (reported separately in the ``diverged`` column).
"""
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

import executors
from errors import UserError, exit_on_user_error

DEFAULT_METRICS = ("Unnormalised_Loss/Test", "Loss/Test")
HYPERPARAMETER_TAGS = ("Hyperparameter/Lr", "Hyperparameter/Weight_Decay", "Hyperparameter/Momentum")
BAYESOPT_MARKERS = ("best.json", "ax_client.json")
LINE_STYLES = ("-", "--", "-.", ":")
COLUMNS = ("dataset", "algorithm", "runs", "diverged", "failed", "median", "mean", "standard_error", "best",
           "median_time_s", "time_ratio_to_random", "trials", "total_time_s")


def read_json(path):
    """A results file as a mapping; a one-line :class:`UserError` for a file
    that is unreadable, not JSON or not a mapping (results are written
    atomically, so such a file is damaged, never half-written)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (a damaged results file)") from None
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (check, what it must be), for the keys the report reads.
RECORD_TYPES = {
    "status": (lambda v: isinstance(v, str), "a string"),
    "algorithm": (lambda v: v is None or isinstance(v, str), "a string"),
    "dataset": (lambda v: v is None or isinstance(v, str), "a string"),
    "wall_time_s": (lambda v: v is None or _is_number(v), "a number"),
    "population_size": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                and v >= 1), "an integer >= 1"),
    "total_training_time_s": (lambda v: v is None or _is_number(v), "a number"),
    "trials": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "final": (lambda v: v is None or isinstance(v, dict), "a mapping of metric to number"),
}


def check_record(path, record):
    """The keys the report reads have the types it needs."""
    for key, (check, expected) in RECORD_TYPES.items():
        if key in record and not check(record[key]):
            raise UserError(f"{path}: {key}: must be {expected}, got {record[key]!r}")
    for metric, value in (record.get("final") or {}).items():
        if value is not None and not _is_number(value):
            raise UserError(f"{path}: final.{metric}: must be a number, got {value!r}")
    return record


def is_bayesopt_trial(run_dir):
    """Trials of a BO campaign live in ``<campaign>/trial_<k>``; they are counted
    through the campaign's best.json, not as runs of their own."""
    return any((run_dir.parent / marker).is_file() for marker in BAYESOPT_MARKERS)


def find_runs(root):
    """One row per run directory with a results.json (BO trials excluded)."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        if is_bayesopt_trial(path.parent):
            continue
        results = read_json(path)
        if "status" not in results:
            continue
        check_record(path, results)
        results["run_dir"] = str(path.parent)
        runs.append(results)
    return runs


def find_failures(root):
    """Run directories that only hold an error.txt (failed runs)."""
    return [path.parent for path in sorted(root.rglob("error.txt"))
            if not (path.parent / "results.json").is_file() and not is_bayesopt_trial(path.parent)]


def find_campaigns(root):
    """One row per Bayesian-optimisation campaign (its best.json)."""
    campaigns = []
    for path in sorted(root.rglob("best.json")):
        best = read_json(path)
        if "trials" in best:
            check_record(path, best)
            best["run_dir"] = str(path.parent)
            campaigns.append(best)
    return campaigns


def choose_metric(requested, records):
    """The requested metric, or the first default that the runs report."""
    available = sorted({key for record in records for key in (record.get("final") or {})})
    if requested:
        if requested not in available:
            raise UserError(f"--metric {requested}: no run reports it; available: {', '.join(available)}")
        return requested
    for metric in DEFAULT_METRICS:
        if any(metric in (record.get("final") or {}) for record in records):
            return metric
    raise UserError("no run reports Unnormalised_Loss/Test or Loss/Test; give --metric")


def final_value(record, metric):
    """The run's final metric; +inf for a diverged run or a non-finite value."""
    value = (record.get("final") or {}).get(metric)
    if record.get("status") == "diverged" or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.inf
    return float(value)


def statistics(values):
    """Median (over all, +inf included), mean +- standard error (finite only), best."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if len(finite) else math.nan
    error = float(finite.std(ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else math.nan
    return {"median": float(np.median(values)) if len(values) else math.nan, "mean": mean,
            "standard_error": error, "best": float(values.min()) if len(values) else math.nan}


def run_time(run):
    """A run's training-loop seconds; a population member's share of its
    population's loop (which every member records whole)."""
    return float(run.get("wall_time_s", math.nan)) / (run.get("population_size") or 1)


def summarise(runs, campaigns, failures, metric):
    """Table rows, grouped by dataset then algorithm."""
    groups = {}
    for run in runs:
        groups.setdefault((run.get("dataset", "?"), run.get("algorithm", "?")), []).append(run)
    rows = []
    for (dataset, algorithm), members in sorted(groups.items()):
        values = [final_value(run, metric) for run in members]
        times = [run_time(run) for run in members]
        failed = sum(1 for path in failures if path.parent.name == algorithm)
        rows.append({"dataset": dataset, "algorithm": algorithm, "runs": len(members),
                     "diverged": sum(run.get("status") == "diverged" for run in members), "failed": failed,
                     **statistics(values), "median_time_s": float(np.nanmedian(times)),
                     "trials": None, "total_time_s": float(np.nansum(times))})
    for dataset in sorted({c.get("dataset", "?") for c in campaigns}):
        members = [c for c in campaigns if c.get("dataset", "?") == dataset]
        for algorithm in sorted({c.get("algorithm", "BayesOpt") for c in members}):
            chosen = [c for c in members if c.get("algorithm", "BayesOpt") == algorithm]
            values = [final_value({"final": c.get("final"), "status": "finished"}, metric) for c in chosen]
            totals = [float(c.get("total_training_time_s", math.nan)) for c in chosen]
            rows.append({"dataset": dataset, "algorithm": f"{algorithm} (BayesOpt)", "runs": len(chosen),
                         "diverged": 0, "failed": 0, **statistics(values),
                         "median_time_s": float(np.nanmedian(totals)),
                         "trials": sum(int(c["trials"]) for c in chosen), "total_time_s": float(np.nansum(totals))})
    for row in rows:
        random = next((r for r in rows if r["dataset"] == row["dataset"] and r["algorithm"] == "Random"), None)
        ratio = row["median_time_s"] / random["median_time_s"] if random and random["median_time_s"] > 0 else None
        row["time_ratio_to_random"] = ratio
    return rows


PAPER_METRICS = (("Loss/Test", "test loss"), ("Unnormalised_Loss/Test", "unnormalised test MSE"))
PAPER_COLUMNS = ("dataset", "algorithm", "runs", "diverged") + tuple(
    f"{metric} {statistic}" for metric, _ in PAPER_METRICS
    for statistic in ("median", "mean", "standard_error")) + ("cost_relative_to_random",)


def paper_rows(runs, campaigns):
    """The paper's table: per dataset and algorithm, the runs, how many
    diverged, median and mean ± standard error of the final normalised test
    loss and (where reported: UCI) of the unnormalised test MSE, and the
    training cost relative to Random (median training-loop time; a
    Bayesian-optimisation campaign costs the total over its trials)."""
    groups = {}
    for run in runs:
        key = (run.get("dataset", "?"), run.get("algorithm", "?"))
        groups.setdefault(key, {"runs": [], "times": []})
        groups[key]["runs"].append(run)
        groups[key]["times"].append(run_time(run))
    for campaign in campaigns:
        key = (campaign.get("dataset", "?"), f"{campaign.get('algorithm', 'BayesOpt')} (BayesOpt)")
        groups.setdefault(key, {"runs": [], "times": []})
        groups[key]["runs"].append({"final": campaign.get("final"), "status": "finished"})
        groups[key]["times"].append(float(campaign.get("total_training_time_s", math.nan)))
    rows = []
    for (dataset, algorithm), group in sorted(groups.items()):
        row = {"dataset": dataset, "algorithm": algorithm, "runs": len(group["runs"]),
               "diverged": sum(run.get("status") == "diverged" for run in group["runs"]),
               "median_time_s": float(np.nanmedian(group["times"]))}
        for metric, _ in PAPER_METRICS:
            if not any(metric in (run.get("final") or {}) for run in group["runs"]):
                continue
            numbers = statistics([final_value(run, metric) for run in group["runs"]])
            for statistic in ("median", "mean", "standard_error"):
                row[f"{metric} {statistic}"] = numbers[statistic]
        rows.append(row)
    for row in rows:
        random = next((r for r in rows if r["dataset"] == row["dataset"]
                       and r["algorithm"] == "Random"), None)
        row["cost_relative_to_random"] = (row["median_time_s"] / random["median_time_s"]
                                          if random and random["median_time_s"] > 0 else None)
    return rows


def paper_markdown(rows):
    """One table per dataset; the unnormalised columns only where the runs report them."""
    sections = []
    for dataset in sorted({row["dataset"] for row in rows}):
        members = [row for row in rows if row["dataset"] == dataset]
        metrics = [(metric, label) for metric, label in PAPER_METRICS
                   if any(f"{metric} median" in row for row in members)]
        header = ["algorithm", "runs", "diverged"]
        for _, label in metrics:
            header += [f"median {label}", f"mean ± s.e. {label}"]
        header.append("cost × Random")
        lines = [f"### {dataset}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in members:
            cells = [row["algorithm"], row["runs"], row["diverged"]]
            for metric, _ in metrics:
                cells += [format_number(row.get(f"{metric} median", math.nan)),
                          f"{format_number(row.get(f'{metric} mean', math.nan))} ± "
                          f"{format_number(row.get(f'{metric} standard_error', math.nan), 2)}"]
            cells.append(format_number(row["cost_relative_to_random"], 3))
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def format_number(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows, metric):
    header = ["algorithm", "runs", "diverged", "failed", f"median {metric}", "mean ± s.e.", "best",
              "median time (s)", "time / Random", "BO trials", "total time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["algorithm"], row["runs"], row["diverged"], row["failed"], format_number(row["median"]),
                 f"{format_number(row['mean'])} ± {format_number(row['standard_error'], 2)}",
                 format_number(row["best"]), format_number(row["median_time_s"], 3),
                 format_number(row["time_ratio_to_random"], 3), format_number(row["trials"]),
                 format_number(row["total_time_s"], 4)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def csv_text(rows, columns=COLUMNS):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plots


def read_scalars(run_dir, tags):
    """``{tag: (steps, values)}`` from a run's TensorBoard logs (all event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags().get("scalars", []))
    series = {}
    for tag in tags:
        if tag in available:
            events = {event.step: event.value for event in accumulator.Scalars(tag)}  # last write wins
            steps = np.array(sorted(events), dtype=float)
            series[tag] = (steps, np.array([events[s] for s in sorted(events)], dtype=float))
    return series


def median_curve(curves):
    """Median across runs on the union of their steps (each run held at its last value)."""
    curves = [(steps, values) for steps, values in curves if len(steps)]
    if not curves:
        return None, None
    grid = np.unique(np.concatenate([steps for steps, _ in curves]))
    stacked = np.stack([np.interp(grid, steps, values, left=np.nan, right=values[-1])
                        for steps, values in curves])
    with np.errstate(all="ignore"):
        return grid, np.nanmedian(stacked, axis=0)


def plot_ecdf(dataset, runs, campaigns, metric, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for run in runs:
        groups.setdefault(run.get("algorithm", "?"), []).append(final_value(run, metric))
    for campaign in campaigns:
        groups.setdefault(f"{campaign.get('algorithm')} (BayesOpt)", []).append(
            final_value({"final": campaign.get("final"), "status": "finished"}, metric))
    for number, (algorithm, values) in enumerate(sorted(groups.items())):
        values = np.sort(np.asarray(values, dtype=float))
        finite = values[np.isfinite(values)]
        if not len(finite):
            continue
        style = LINE_STYLES[number % len(LINE_STYLES)]
        if len(values) == 1:  # one BO campaign: its best trial, a vertical line
            axes.axvline(finite[0], linestyle=style, color=f"C{number}", label=f"{algorithm} (1)")
            continue
        fractions = np.concatenate([[0.0], np.arange(1, len(finite) + 1) / len(values)])
        axes.step(np.concatenate([[finite[0]], finite]), fractions, where="post", linestyle=style,
                  color=f"C{number}", label=f"{algorithm} ({len(values)})")
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel(f"final {metric}")
    axes.set_ylabel("fraction of runs ≤ x")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{dataset}: empirical CDF of final {metric}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def plot_trajectories(dataset, runs, metric, path):
    """Median metric and hyperparameters against weight step, per algorithm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = (metric, *HYPERPARAMETER_TAGS)
    figure, axes = plt.subplots(len(tags), 1, figsize=(7, 9), sharex=True)
    groups = {}
    for run in runs:
        groups.setdefault(run.get("algorithm", "?"), []).append(run)
    drawn = False
    for number, (algorithm, members) in enumerate(sorted(groups.items())):
        series = [read_scalars(run["run_dir"], tags) for run in members]
        for axis, tag in zip(axes, tags):
            grid, median = median_curve([s[tag] for s in series if tag in s])
            if grid is None:
                continue
            axis.plot(grid, median, label=f"{algorithm} ({len(members)})", color=f"C{number}",
                      linestyle=LINE_STYLES[number % len(LINE_STYLES)])
            drawn = True
    for axis, tag in zip(axes, tags):
        axis.set_ylabel(f"median\n{tag}" if tag == metric else tag.split("/")[-1].replace("_", " "), fontsize=9)
        if tag != HYPERPARAMETER_TAGS[2]:
            axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{dataset}: median {metric} and hyperparameters")
    axes[-1].set_xlabel("weight step")
    if drawn:
        axes[0].legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def save_figure(figure, path):
    """PNG written beside its final name, then moved into place."""
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)


def slug(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


# ----------------------------------------------------------------------------- main


def report(root, metric=None, plots=True):
    """Write report.csv, report.md and the PNGs into ``root``; returns the rows."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: not a directory; give the directory that holds the runs")
    if not root.is_dir():
        raise UserError(f"{root}: runs directory not found")
    runs, campaigns, failures = find_runs(root), find_campaigns(root), find_failures(root)
    if not runs and not campaigns:
        raise UserError(f"{root}: no results.json or best.json found under it")
    metric = choose_metric(metric, runs + campaigns)
    rows = summarise(runs, campaigns, failures, metric)
    paper = paper_rows(runs, campaigns)
    sections = [f"# Report: {root.name}\n",
                "## The paper's table\n",
                "Final test loss (normalised) and, for UCI, the unnormalised test MSE. Diverged "
                "runs count as +∞ in the median; the mean ± standard error is over the others. "
                "Cost: median training-loop time relative to Random's (a Bayesian-optimisation "
                "row: the total over its trials).\n",
                paper_markdown(paper),
                f"## Details: final `{metric}`\n",
                f"Metric: final `{metric}`. Diverged runs count as +∞ "
                f"(median and CDF); the mean ± standard error is over the others.\n"]
    for dataset in sorted({row["dataset"] for row in rows}):
        dataset_rows = [row for row in rows if row["dataset"] == dataset]
        sections += [f"## {dataset}\n", markdown_table(dataset_rows, metric), ""]
        if plots:
            dataset_runs = [run for run in runs if run.get("dataset", "?") == dataset]
            dataset_campaigns = [c for c in campaigns if c.get("dataset", "?") == dataset]
            ecdf = root / f"ecdf_{slug(dataset)}.png"
            plot_ecdf(dataset, dataset_runs, dataset_campaigns, metric, ecdf)
            sections.append(f"![empirical CDF]({ecdf.name})\n")
            if dataset_runs:
                trajectories = root / f"trajectories_{slug(dataset)}.png"
                plot_trajectories(dataset, dataset_runs, metric, trajectories)
                sections.append(f"![median trajectories]({trajectories.name})\n")
    executors.write_atomically(root / "report.csv", csv_text(rows))
    executors.write_atomically(root / "paper_table.csv", csv_text(paper, PAPER_COLUMNS))
    executors.write_atomically(root / "report.md", "\n".join(sections))
    return rows


def build_parser():
    parser = executors.CommandLine(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="directory holding run directories (searched recursively)")
    parser.add_argument("--metric", help="final metric to compare (default: Unnormalised_Loss/Test, "
                                         "else Loss/Test)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    return parser


@exit_on_user_error
def main(argv=None):
    arguments = build_parser().parse_args(argv)
    rows = report(arguments.runs_dir, arguments.metric, arguments.plots)
    print(f"{len(rows)} table rows written to {Path(arguments.runs_dir) / 'report.md'} and report.csv",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
