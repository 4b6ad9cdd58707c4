"""Populations: many runs of one configuration as one ``torch.func.vmap``
over the pure step (``population.main``, ``train.py --population``).

A member must give what the same run gives alone (float64: rtol 1e-10),
write its run directory as a single run does, freeze alone when it
diverges, and resume bit for bit after a kill. The pieces of the step
(weight updates, solvers, outer optimisers) must run batched.
"""
import math
from pathlib import Path

import pytest
import torch

import config
import generators
import linear_solvers
import population
import train
from errors import UserError
from optimisers import HYPERPARAMETER_OPTIMISERS, OPTIMISERS
from step import Program, stack, vectorised
from test_train import ALGORITHMS  # every algorithm file

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SHORT = {"hyperparameter_steps": 3, "network_weight_steps": 4, "log_interval": 4,
         "device": "cpu", "batch_size": 32, "dtype": "float64"}


def test_every_algorithm_file_is_tested():
    on_disk = {p.stem for p in CONFIGS.glob("*.yaml")
               if p.stem.startswith(("Random", "Baydin", "Lorraine", "Ours", "DiffThrough",
                                     "LongDiffThrough"))}
    assert on_disk == set(ALGORITHMS)


def members_of(count, seed, settings, tmp_path, generator="natural_sgd"):
    draws = generators.generate(generator, count, seed)
    return [{"overrides": {**override, **settings}, "run_dir": str(tmp_path / f"member_{k}"),
             "name": None} for k, override in enumerate(draws)]


def kill_population_after(steps, monkeypatch, sources, members):
    """Train ``members`` as a population that dies (``KeyboardInterrupt``)
    at its step ``steps + 1``, as a killed process would stop there."""
    calls = {"count": 0}
    original = Program.step

    def step_then_die(self, state, batches):
        calls["count"] += 1
        if calls["count"] == steps + 1:
            raise KeyboardInterrupt("killed")
        return original(self, state, batches)

    monkeypatch.setattr(Program, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        population.main(sources, members, progress=False)
    monkeypatch.setattr(Program, "step", original)


def assert_same_run(member, alone, rtol):
    assert member["status"] == alone["status"]
    assert member["network_weight_steps_done"] == alone["network_weight_steps_done"]
    for section in ("final", "hyperparameters"):
        assert set(member[section]) == set(alone[section])
        for key, value in alone[section].items():
            assert member[section][key] == pytest.approx(value, rel=rtol, abs=1e-300), \
                (section, key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_members_equal_the_same_runs_alone(algorithm, tmp_path):
    sources = [CONFIGS / "digits.yaml", CONFIGS / f"{algorithm}.yaml"]
    members = members_of(3, 11, SHORT, tmp_path)
    together = population.main(sources, members, progress=False)
    hyperparameters = set()
    for member, result in zip(members, together):
        assert result["population_size"] == 3 and result["run_dir"] == member["run_dir"]
        alone = train.main(sources, member["overrides"], log_root=tmp_path / "alone",
                           progress=False)
        assert_same_run(result, alone, rtol=1e-10)
        hyperparameters.add(tuple(result["hyperparameters"].values()))
    assert len(hyperparameters) == 3, "the members must differ"


@pytest.mark.parametrize("dataset, settings", [
    ("uci_energy", {"batch_size": "full", "dtype": "float32"}),
    ("diabetes", {"batch_size": 40, "dtype": "float32"}),
], ids=["uci_energy-full_batch-float32", "diabetes-minibatch-float32"])
def test_float32_members_equal_runs_alone_to_rounding(dataset, settings, tmp_path, request):
    if dataset == "uci_energy":
        request.getfixturevalue("uci_available")
    sources = [CONFIGS / f"{dataset}.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    members = members_of(3, 4, {**SHORT, **settings}, tmp_path)
    for member, result in zip(members, population.main(sources, members, progress=False)):
        alone = train.main(sources, member["overrides"], log_root=tmp_path / "alone",
                           progress=False)
        assert_same_run(result, alone, rtol=1e-4)


def test_member_config_reproduces_the_member_alone(tmp_path, capsys):
    """``train.py --population``: one run directory per member whose
    ``config.yaml`` reruns that member with plain ``train.py -c``."""
    code = train.cli(["-c", str(CONFIGS / "digits.yaml"), str(CONFIGS / "Ours_LR.yaml"),
                      "--population", "2", "--seed", "7", "-l", str(tmp_path), "-g", "g", "-q",
                      "--set", "hyperparameter_steps=3", "network_weight_steps=4",
                      "log_interval=4", "device=cpu", "dtype=float64"])
    assert code == 0
    output = capsys.readouterr().out
    assert "population of 2: 2 finished, 0 diverged" in output
    run_dirs = sorted((tmp_path / "g").iterdir())
    assert [d.name.rsplit("-", 1)[-1] for d in run_dirs] == ["0", "1"]
    draws = generators.generate("natural_sgd", 2, 7)
    for run_dir, draw in zip(run_dirs, draws):
        import json
        result = json.loads((run_dir / "results.json").read_text())
        saved = config.read_yaml(run_dir / "config.yaml")
        assert saved["seed"] == draw["seed"]
        assert saved["network_weight"]["lr"] == draw["network_weight.lr"]
        alone = train.main([run_dir / "config.yaml"], log_root=tmp_path / "alone", progress=False)
        assert_same_run(result, alone, rtol=1e-10)
        from test_train import scalars
        tags = set(scalars(run_dir).Tags()["scalars"])
        assert {"Loss/Training", "Loss/Test", "Loss/Validation", "Hyperparameter/Lr",
                "Hypergradient/Lr", "Final/Loss/Test"} <= tags


def test_per_weight_learning_rates_are_logged_per_member(tmp_path):
    from test_train import scalars
    members = members_of(2, 0, SHORT, tmp_path)
    population.main([CONFIGS / "digits.yaml", CONFIGS / "Ours_HDLR_Momentum.yaml"],
                          members, progress=False)
    for member in members:
        logged = scalars(member["run_dir"])
        assert "Hyperparameter/Lr" in logged.Tags()["histograms"]
        assert "Hyperparameter/Lr_Mean" in logged.Tags()["scalars"]


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "Ours_HDLR_Momentum"])
def test_a_diverging_member_is_frozen_and_the_others_go_on(algorithm, tmp_path):
    """Per-weight learning rates too: a diverged member's non-finite ones are
    left out of its histogram instead of failing the population."""
    sources = [CONFIGS / "diabetes.yaml", CONFIGS / f"{algorithm}.yaml"]
    settings = {"hyperparameter_steps": 12, "log_interval": 20, "device": "cpu",
                "dtype": "float64"}
    lrs = [-2.0, 0.0, -2.5]  # the middle one (lr 1, the clipping bound) diverges
    members = [{"overrides": {**settings, "network_weight.lr": lr, "seed": k},
                "run_dir": str(tmp_path / f"m{k}")} for k, lr in enumerate(lrs)]
    together = population.main(sources, members, progress=False)
    assert [r["status"] for r in together] == ["finished", "diverged", "finished"]
    assert together[1]["network_weight_steps_done"] < 120
    assert together[1]["objective"] == 1e10
    for member, result in zip(members, together):
        alone = train.main(sources, member["overrides"], log_root=tmp_path / "alone",
                           progress=False)
        assert result["network_weight_steps_done"] == alone["network_weight_steps_done"]
        if result["status"] == "finished":
            assert_same_run(result, alone, rtol=1e-10)
    assert not any((Path(m["run_dir"]) / "checkpoint.pt").exists() for m in members)


def test_killed_population_resumes_bit_for_bit(tmp_path, monkeypatch):
    sources = [CONFIGS / "digits.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    settings = {"hyperparameter_steps": 8, "checkpoint_every": 3, "device": "cpu",
                "log_interval": 10}
    whole = population.main(sources, members_of(3, 1, settings, tmp_path / "whole"),
                                  progress=False)
    killed = members_of(3, 1, settings, tmp_path / "killed")
    kill_population_after(6, monkeypatch, sources, killed)
    assert all((Path(m["run_dir"]) / "checkpoint.pt").is_file() for m in killed)
    # one member's checkpoint as written before the counters moved into the state
    from test_train import as_written_before_the_counters_moved_into_the_state
    as_written_before_the_counters_moved_into_the_state(Path(killed[2]["run_dir"]) / "checkpoint.pt")
    # one member resumes alone, as a single run; the other two as a re-packed population
    alone = train.main(sources, run_dir=killed[0]["run_dir"], overrides=killed[0]["overrides"],
                       progress=False)
    resumed = [alone] + population.main(sources, killed[1:], progress=False)
    # training is bit for bit everywhere; the final metrics too, except that a
    # population evaluates them vmapped and the run alone not: float32 rounding
    assert alone["final"] == pytest.approx(whole[0]["final"], rel=1e-6, abs=0)
    for before, after in zip(whole, resumed):
        if after is not alone:
            assert after["final"] == before["final"]
        assert after["hyperparameters"] == before["hyperparameters"]
        assert after["network_weight_steps_done"] == before["network_weight_steps_done"]


@pytest.mark.parametrize("algorithm", ["Random", "Baydin", "Ours_LR_Momentum", "DiffThroughOpt"])
def test_each_members_counters_live_in_the_population_state(algorithm, tmp_path):
    """The pure step advances the step counters in the state: vmapped, each
    member's equal what the same run's own eager step gives (plain updates
    only, differentiated updates only, both)."""
    cfg, program, members, _ = population.build_members(
        [CONFIGS / "digits.yaml", CONFIGS / f"{algorithm}.yaml"],
        members_of(3, 0, SHORT, tmp_path), "runs", None, None)
    steps = cfg["network_weight_steps"]
    alone = [member.state for member in members]
    state = stack(alone)
    vmapped = program.wrapped(vectorised)
    for _ in range(2):
        member_batches = [member.samplers.batches(program, steps) for member in members]
        stacked = {"training": [population.stacked_indices(member_batches,
                                                           lambda b, k=k: b["training"][k])
                                for k in range(steps)],
                   "validation": population.stacked_indices(member_batches,
                                                            lambda b: b["validation"])}
        state, _ = vmapped.step(state, stacked)
        alone = [program.step(one, batches)[0] for one, batches in zip(alone, member_batches)]
    assert state["hyperparameter_step"].dtype == torch.int64
    assert state["hyperparameter_step"].tolist() == [2, 2, 2]
    assert state["weight_step"].tolist() == [2 * steps] * 3
    assert [int(one["weight_step"]) for one in alone] == state["weight_step"].tolist()
    assert [int(one["hyperparameter_step"]) for one in alone] == [2, 2, 2]
    for member in members:
        member.tracker.close()


@pytest.mark.parametrize("algorithm", ["Random", "Ours_LR_Momentum"])
def test_members_sharing_a_full_batch_take_one_matrix_product_not_one_per_member(algorithm, tmp_path):
    """With the whole training split as every member's batch (diabetes, as UCI
    energy), no product over the shared inputs (10 features) is batched over
    members: the population's linear layers are folded (models.FoldedLinear),
    which makes the compiled UCI-energy step 15-20% faster. Products over the
    members' own hidden activations stay batched. The runs alone keep F.linear."""
    cfg, program, members, _ = population.build_members(
        [CONFIGS / "diabetes.yaml", CONFIGS / f"{algorithm}.yaml"],
        members_of(3, 0, {**SHORT, "batch_size": "full"}, tmp_path), "runs", None, None)
    state = stack([member.state for member in members])
    with torch.profiler.profile(record_shapes=True) as profile:
        program.wrapped(vectorised).step(state, population.batches(members, program, 4))
    products = [(event.name, event.input_shapes) for event in profile.events()
                if event.name in ("aten::mm", "aten::bmm")]
    over_inputs = [(name, shapes) for name, shapes in products if any(10 in shape for shape in shapes)]
    assert over_inputs and all(name == "aten::mm" for name, _ in over_inputs), over_inputs
    alone = train.load_problem(cfg, torch.device("cpu"), torch.float64).model
    assert not any(getattr(layer, "folded", False) for layer in alone.modules())
    for member in members:
        member.tracker.close()


def test_refusal_reads_a_dataset_once_and_only_for_its_sizes(monkeypatch):
    """The fan-out asks once per algorithm; the model is built on the meta
    device (no weights) from the data's sizes, read once per dataset."""
    import datasets
    reads = []
    original = datasets.load_data
    monkeypatch.setattr(datasets, "load_data",
                        lambda *arguments, **options: reads.append(1) or original(*arguments,
                                                                                  **options))
    monkeypatch.setattr(population, "_DATA_SIZES", {})
    for algorithm in ("Lorraine", "Ours_LR", "Ours_HDLR_Momentum"):  # one validation split
        assert population.refusal([CONFIGS / "diabetes.yaml", CONFIGS / f"{algorithm}.yaml"]) is None
    assert len(reads) == 1
    structure = population.model_structure(population.train.prepare(config.load(
        [CONFIGS / "diabetes.yaml", CONFIGS / "Random.yaml"], [])))
    assert all(weight.is_meta for weight in structure.parameters())


def test_population_memory_stays_flat(tmp_path):
    """A population's step keeps nothing alive across hyperparameter steps."""
    from test_hypergradients import count_tensors
    cfg, program, members, _ = population.build_members(
        [CONFIGS / "digits.yaml", CONFIGS / "Ours_HDLR_Momentum.yaml"],
        members_of(4, 0, SHORT, tmp_path), "runs", None, None)
    vmapped = program.wrapped(vectorised)
    state = stack([m.state for m in members])
    for _ in range(3):
        state, _ = vmapped.step(state, population.batches(members, program, 4))
    before = count_tensors()
    for _ in range(10):
        state, _ = vmapped.step(state, population.batches(members, program, 4))
    assert count_tensors() <= before + 2
    for member in members:
        member.tracker.close()


# ---------------------------------------------------------- batched pieces

def batched_equals_each(function, batched_arguments, rtol=1e-12):
    """vmap of ``function`` over stacked arguments against one call per member."""
    count = len(batched_arguments)
    together = vectorised(function)(*[stack(list(parts)) for parts in zip(*batched_arguments)])
    from step import member
    from trees import tree_leaves
    for index in range(count):
        alone = function(*batched_arguments[index])
        for a, b in zip(tree_leaves(member(together, index)), tree_leaves(alone)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-14)
    return together


def random_tree(generator, shapes):
    return tuple(torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_weight_update_runs_batched(name):
    generator = torch.Generator().manual_seed(0)
    optimiser = OPTIMISERS.get(name)()
    shapes = [(3, 4), (3,)]
    arguments = []
    for _ in range(3):
        weights, grads = random_tree(generator, shapes), random_tree(generator, shapes)
        hypers = {key: torch.rand((), generator=generator, dtype=torch.float64) * 0.1
                  for key in optimiser.hyperparameters}
        hypers["lr"] = tuple(torch.rand(s, generator=generator, dtype=torch.float64)
                             for s in shapes)  # per-weight
        state = optimiser.update(weights, grads, optimiser.init(weights), hypers)[1]
        arguments.append((weights, grads, state, hypers))
    batched_equals_each(optimiser.update, arguments)


@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_solvers_run_batched(solver):
    """Each member solves its own system; CG's members stop at their own
    iteration (a mask, not a branch): one system is solved at the start."""
    generator = torch.Generator().manual_seed(0)
    arguments = []
    for k in range(3):
        basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
        jacobian = basis @ torch.diag(torch.linspace(0.1, 0.5, 5, dtype=torch.float64)) @ basis.T
        b = (torch.zeros(5, dtype=torch.float64) if k == 1
             else torch.randn(5, generator=generator, dtype=torch.float64),)
        arguments.append((jacobian, b))
    solve = linear_solvers.get_solver(solver)

    def solution(jacobian, b):
        return solve(lambda v: (v[0] @ jacobian,), b, 30)[0]

    together = batched_equals_each(solution, arguments, rtol=1e-10)
    for index, (jacobian, b) in enumerate(arguments):
        exact = torch.linalg.solve((torch.eye(5, dtype=torch.float64) - jacobian).T, b[0])
        torch.testing.assert_close(together[0][index], exact, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name, options", [("Adam", {"lr": 0.05}), ("SGD", {"momentum": 0.9})])
def test_outer_optimisers_run_batched(name, options):
    generator = torch.Generator().manual_seed(0)
    optimiser = HYPERPARAMETER_OPTIMISERS.build({"class": name, **options}, "test")
    arguments = []
    for _ in range(3):
        params = {"lr": torch.randn((), generator=generator, dtype=torch.float64),
                  "momentum": random_tree(generator, [(3,), (2, 2)])}
        grads = {"lr": torch.randn((), generator=generator, dtype=torch.float64),
                 "momentum": random_tree(generator, [(3,), (2, 2)])}
        state = optimiser.update(params, grads, optimiser.init(params))[1]
        arguments.append((params, grads, state))
    batched_equals_each(optimiser.update, arguments)


# ---------------------------------------------------------- refusals

def test_what_does_not_vectorise_is_refused_with_one_line_naming_the_key(tmp_path):
    digits = [CONFIGS / "digits.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    assert population.refusal(digits, {"device": "cpu"}) is None
    batch_norm = population.refusal(digits, {"model.batch_norm": True, "device": "cpu"})
    assert batch_norm.startswith("--set: model.batch_norm: a population cannot vectorise")
    teaching = population.refusal([CONFIGS / "digits_teaching.yaml",
                                    CONFIGS / "AuxiLearn_Linear.yaml"])
    assert "teaching.class" in teaching and "population" in teaching  # tests/test_teaching_population.py
    for reason in (batch_norm, teaching):
        assert "\n" not in reason
    members = [{"overrides": {"device": "cpu", "seed": 1}},
               {"overrides": {"device": "cpu", "seed": 2, "hyperparameter_steps": 5}}]
    with pytest.raises(UserError, match="^--set: hyperparameter_steps: population members may "
                                        "differ only in"):
        population.main(digits, members, log_root=tmp_path, progress=False)


def test_lstm_and_dropout_are_refused(tmp_path):
    folder = tmp_path / "penn_treebank"
    folder.mkdir()
    for split, text in (("train", "the cat sat on the mat\n" * 20), ("valid", "the cat sat\n" * 5),
                        ("test", "the mat sat\n" * 5)):
        (folder / f"ptb.{split}.txt").write_text(text)
    sources = [CONFIGS / "penn_treebank.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    small = {"data_root": str(tmp_path), "dataset.sequence_length": 4, "batch_size": 4,
             "model.embedding_size": 8, "model.hidden_size": 8, "device": "cpu"}
    fused = population.refusal(sources, {**small, "model.fused": True})
    assert fused.startswith("--set: model.fused:") and "nn.LSTM" in fused
    dropout = population.refusal(sources, small)
    assert dropout.startswith(f"{CONFIGS / 'penn_treebank.yaml'}: model.dropout:")
    assert population.refusal(sources, {**small, "model.dropout": 0.0}) is None


def test_population_command_line_errors_exit_2(tmp_path, capsys):
    base = ["-c", str(CONFIGS / "digits.yaml"), str(CONFIGS / "Ours_LR_Momentum.yaml"), "-q",
            "-l", str(tmp_path)]
    for extra, expected in (
            (["--population", "2", "--set", "model.batch_norm=true"], "--set: model.batch_norm"),
            (["--population", "0"], "--population"),
            (["--population", "2", "--run-dir", str(tmp_path / "x")], "--run-dir"),
            (["--population", "2", "--generator", "nope"], "generator"),
            (["--generator", "natural_sgd"], "--generator")):
        with pytest.raises(SystemExit) as exit_status:
            train.cli(base + extra)
        assert exit_status.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and expected in error


def test_batch_size_full_and_larger_than_the_split_mean_the_whole_split(digits_trainer):
    for batch_size in ("full", 10 ** 6):
        trainer = digits_trainer("Random", batch_size=batch_size)
        assert trainer.samplers.training.next() is None
        assert trainer.samplers.validation.next() is None
    assert digits_trainer("Random", batch_size=32).samplers.training.next().shape == (32,)


def test_compiled_population_matches_eager_population(tmp_path, capsys):
    sources = [CONFIGS / "digits.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    eager = population.main(sources, members_of(3, 2, SHORT, tmp_path / "eager"),
                                  progress=True)
    assert "compil" not in capsys.readouterr().err
    compiled = population.main(
        sources, members_of(3, 2, {**SHORT, "compile": True}, tmp_path / "compiled"),
        progress=True)
    # the bar would stand at 0 through the compilation: it is said instead
    said = capsys.readouterr().err
    assert "compiling before training" in said and "compiled in" in said
    for a, b in zip(compiled, eager):
        assert a["compile_time_s"] > 0
        assert_same_run(a, b, rtol=1e-8)
        assert not math.isnan(a["final"]["Loss/Test"])
