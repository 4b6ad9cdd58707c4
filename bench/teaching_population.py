"""Wall time of N teaching runs (seeds) as one population against the same N
runs one after another in this process, and the largest difference between
a member's objective and its run alone.

    python bench/teaching_population.py GTN_Curriculum --members 8 --set teaching.outer_steps=50
    python bench/teaching_population.py Commentary_ExampleWeighting --members 4 --device cuda
"""
import argparse
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import population  # noqa: E402
import train  # noqa: E402

DATA = {"GTN": "digits_teaching", "Commentary_ExampleWeighting": "rotated_digits_overlapping"}


def config_files(algorithm):
    """The data and algorithm files a pure teaching method's bench runs."""
    data = next(name for prefix, name in DATA.items() if algorithm.startswith(prefix))
    return [str(ROOT / "configs" / f"{data}.yaml"), str(ROOT / "configs" / f"{algorithm}.yaml")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("algorithm", help="a configs/<algorithm>.yaml of a pure teaching method")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    arguments = parser.parse_args(argv)
    sources = config_files(arguments.algorithm)
    settings = arguments.set + [f"device={arguments.device}"]
    seeds = range(arguments.members)
    with tempfile.TemporaryDirectory() as directory:
        root = pathlib.Path(directory)
        started = time.perf_counter()
        together = population.main(sources, [{"overrides": settings + [f"seed={seed}"],
                                              "run_dir": str(root / f"member{seed}")} for seed in seeds],
                                   progress=False)
        vectorised = time.perf_counter() - started
        started = time.perf_counter()
        alone = [train.main(sources, settings + [f"seed={seed}"], run_dir=root / f"alone{seed}", progress=False)
                 for seed in seeds]
        sequential = time.perf_counter() - started
    difference = max(abs(a["objective"] - b["objective"]) for a, b in zip(together, alone))
    print(f"{arguments.algorithm}, {arguments.members} members on {arguments.device}: population "
          f"{vectorised:.1f} s, one after another {sequential:.1f} s (x{sequential / vectorised:.2f}); "
          f"largest objective difference {difference:.1e}")


if __name__ == "__main__":
    main()
