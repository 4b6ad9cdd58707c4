"""``compile: true`` for teaching: ``torch.compile`` (:func:`engine.compiler`)
of a pure method's outer step (ExampleWeighting, GTN: ``torch.func``
transforms nested in the core's ``hypergradients.unrolled``), alone and
vmapped over a population. A compiled run equals the eager run to float64
rounding, compiles once (no recompilation on later steps) and before its
timed loop; methods without a pure step are refused in one line."""
import json

import pytest
import torch

import train
from torch._dynamo.utils import counters
from test_teaching_population import FLOAT64, TINY, assert_member_is_the_run_alone, sources

COMPILED = ["compile=true"]


@pytest.mark.parametrize("algorithm", ["Commentary_ExampleWeighting", "GTN_Curriculum"])
def test_compiled_teaching_run_equals_the_eager_run(tmp_path, capsys, algorithm):
    """ExampleWeighting's chunked unroll (vjp per chunk of grad-of-grad
    steps) and GTN's truncated one, each compiled as one graph."""
    settings = TINY[algorithm] + FLOAT64
    eager = train.main(sources(algorithm), settings, run_dir=tmp_path / "eager", progress=False)
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train.main(sources(algorithm), settings + COMPILED, run_dir=tmp_path / "compiled",
                              progress=True)
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per outer step
    said = capsys.readouterr().err  # the bar stands still while compiling: it is said
    assert "compiling before training" in said and "compiled in" in said
    assert eager["compile_time_s"] == 0.0 and compiled["compile_time_s"] > 0.0
    assert_member_is_the_run_alone(tmp_path / "compiled", tmp_path / "eager")


def test_compiled_teaching_population_equals_the_eager_runs(tmp_path, capsys):
    algorithm = "GTN_Curriculum"
    settings = TINY[algorithm] + FLOAT64
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        status = train.cli(["-c", *sources(algorithm), "--population", "2", "--seed", "3",
                            "-l", str(tmp_path / "population"), "--set", *settings, *COMPILED])
    assert status == 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert "compiled in" in capsys.readouterr().err
    members = sorted((tmp_path / "population").rglob("results.json"))
    assert len(members) == 2
    for path in members:
        seed = json.loads(path.read_text())["seed"]
        assert json.loads(path.read_text())["compile_time_s"] > 0.0
        alone = tmp_path / f"alone{seed}"
        train.main(sources(algorithm), settings + [f"seed={seed}"], run_dir=alone, progress=False)
        assert_member_is_the_run_alone(path.parent, alone)


def test_compile_is_refused_for_methods_without_a_pure_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        train.cli(["-c", *sources("Commentary_Augmentation"), "-q", "-l", str(tmp_path), "--set", "compile=true"])
    error = capsys.readouterr().err.strip()
    assert exit_status.value.code == 2 and "\n" not in error
    assert "--set: compile: true is not supported for teaching.class: Augmentation" in error
    assert not list(tmp_path.rglob("results.json"))
