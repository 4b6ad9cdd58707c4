"""train.py end to end: every algorithm file on digits, diabetes and UCI energy,
TensorBoard output read back with TensorBoard's own reader, divergence,
checkpoint/resume, configuration stacking."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import config
import train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
ALGORITHMS = ["Random", "Random_SteppedLR", "Random_Validation", "Random_Validation_BayesOpt",
              "Random_TrainingSetOnly", "Baydin", "Lorraine", "Ours_LR", "Ours_LR_Momentum",
              "Ours_HDLR_Momentum", "DiffThroughOpt",
              "LongDiffThroughOpt_UCI_Medium", "LongDiffThroughOpt_UCI_Standalone",
              "LongDiffThroughOpt_UCI_Full", "LongDiffThroughOpt_Fashion-MNIST_Medium",
              "LongDiffThroughOpt_Fashion-MNIST_Standalone",
              "LongDiffThroughOpt_Fashion-MNIST_Full"]
SHORT = {"hyperparameter_steps": 3, "network_weight_steps": 4, "log_interval": 4,
         "device": "cpu"}


def test_every_algorithm_file_is_tested():
    on_disk = {p.stem for p in CONFIGS.glob("*.yaml")
               if p.stem.startswith(("Random", "Baydin", "Lorraine", "Ours", "DiffThrough",
                                     "LongDiffThrough"))}
    assert on_disk == set(ALGORITHMS)


def scalars(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("dataset", ["digits", "diabetes", "uci_energy"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_runs_and_logs(algorithm, dataset, tmp_path, request):
    if dataset == "uci_energy":
        request.getfixturevalue("uci_available")
    results = train.main([CONFIGS / f"{dataset}.yaml", CONFIGS / f"{algorithm}.yaml"], SHORT,
                         log_root=tmp_path, progress=False)
    assert results["status"] == "finished"
    assert all(math.isfinite(v) for v in results["final"].values())
    steps = 12 if algorithm != "Baydin" else 12  # Baydin: 12 single-step updates
    assert results["network_weight_steps_done"] == steps
    assert json.loads((Path(results["run_dir"]) / "results.json").read_text()) == results
    tags = set(scalars(results["run_dir"]).Tags()["scalars"])
    expected = {"Loss/Training", "Loss/Test", "Hyperparameter/Lr",
                "Hyperparameter/Weight_Decay", "Hyperparameter/Momentum"}
    if algorithm != "Random_Validation_BayesOpt":
        expected.add("Loss/Validation")
    expected |= {"Unnormalised_Loss/Test"} if dataset != "digits" else {"Accuracy/Test"}
    optimised = config.load([CONFIGS / f"{algorithm}.yaml"], {"model": {}, "loss": {},
                                                               "dataset": {}})
    expected |= {f"Hypergradient/{name.title()}"
                 for name in optimised["optimised_hyperparameters"]}
    if algorithm == "Ours_HDLR_Momentum":
        expected = (expected - {"Hyperparameter/Lr"}) | {"Hyperparameter/Lr_Mean"}
    assert expected <= tags, expected - tags


def test_per_weight_learning_rates_are_logged_as_a_histogram(tmp_path):
    results = train.main([CONFIGS / "digits.yaml", CONFIGS / "Ours_HDLR_Momentum.yaml"], SHORT,
                         log_root=tmp_path, progress=False)
    accumulator = scalars(results["run_dir"])
    assert "Hyperparameter/Lr" in accumulator.Tags()["histograms"]
    histogram = accumulator.Histograms("Hyperparameter/Lr")[-1].histogram_value
    assert histogram.num == 64 * 50 + 50 + 50 * 10 + 10
    assert histogram.min < histogram.max  # the learning rates have moved apart


def test_hparams_summary_is_written(tmp_path):
    results = train.main([CONFIGS / "digits.yaml", CONFIGS / "Ours_LR.yaml"], SHORT,
                         log_root=tmp_path, progress=False)
    accumulator = scalars(results["run_dir"])
    plugins = accumulator.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins


def test_hyperparameter_optimisation_moves_hyperparameters_and_lowers_validation(tmp_path):
    common = {"hyperparameter_steps": 40, "device": "cpu", "network_weight.lr": -2.5}
    fixed = train.main([CONFIGS / "digits.yaml", CONFIGS / "Random.yaml"], common,
                       log_root=tmp_path, progress=False)
    tuned = train.main([CONFIGS / "digits.yaml", CONFIGS / "Ours_LR_Momentum.yaml"], common,
                       log_root=tmp_path, progress=False)
    assert tuned["hyperparameters"]["lr"] > 10 ** -2.5 * 1.5
    assert tuned["final"]["Loss/Validation"] < 0.8 * fixed["final"]["Loss/Validation"]


def test_stepped_lr_multiplies_the_learning_rate(tmp_path):
    results = train.main([CONFIGS / "digits.yaml", CONFIGS / "Random_SteppedLR.yaml"],
                         {**SHORT, "network_weight.lr_multiplier": 0.5}, log_root=tmp_path,
                         progress=False)
    assert results["hyperparameters"]["lr"] == pytest.approx(10 ** -1.5 * 0.5 ** 3, rel=1e-5)


@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_trainer_hypergradient_equals_the_autograd_reference(digits_trainer, solver):
    """The step's fast path (one recorded vjp of the training gradient, SGD's
    closed-form Jacobian products) gives the same hypergradients, step after
    step, as one ``torch.func.vjp`` through the whole update."""
    settings = {"dtype": "float64", "hypergradient.solver": solver}
    fast = digits_trainer("Ours_LR_Momentum", **settings)
    torch.manual_seed(0)
    slow = digits_trainer("Ours_LR_Momentum", **settings, **{"hypergradient.closed_form": False})
    for _ in range(3):
        fast.step()
        slow.step()
        assert set(fast.last_hypergradients) == {"lr", "weight_decay", "momentum"}
        for name, value in slow.last_hypergradients.items():
            torch.testing.assert_close(fast.last_hypergradients[name], value,
                                       rtol=1e-10, atol=1e-14)
            assert value.abs() > 0
    for a, b in zip(fast.weights, slow.weights):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_divergence_stops_cleanly_with_a_finite_penalty(tmp_path):
    results = train.main([CONFIGS / "diabetes.yaml", CONFIGS / "Random.yaml"],
                         {"network_weight.lr": 0.0, "hyperparameter_steps": 50,  # lr 1, the clip
                          "log_interval": 10, "device": "cpu"},
                         log_root=tmp_path, progress=False)
    assert results["status"] == "diverged"
    assert results["objective"] == 1e10
    assert results["network_weight_steps_done"] < 500


def final_state(results):
    return (results["final"], results["hyperparameters"], results["network_weight_steps_done"])


def test_killed_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    sources = [CONFIGS / "digits.yaml", CONFIGS / "Ours_LR_Momentum.yaml"]
    settings = {"hyperparameter_steps": 10, "checkpoint_every": 3, "device": "cpu",
                "log_interval": 10}
    uninterrupted = train.main(sources, settings, run_dir=tmp_path / "whole", progress=False)

    from engine import Trainer
    original_step = Trainer.step

    def step_then_die(self):
        if self.hyperparameter_step == 7:
            raise KeyboardInterrupt("killed")
        original_step(self)

    monkeypatch.setattr(Trainer, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(sources, settings, run_dir=tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(Trainer, "step", original_step)
    resumed = train.main(sources, settings, run_dir=tmp_path / "killed", progress=False)
    assert final_state(resumed) == final_state(uninterrupted)  # bitwise on CPU


def test_sigkilled_process_resumes_to_the_same_result(tmp_path):
    """A real kill -9 in the middle of training, then the same command again."""
    command = [sys.executable, str(ROOT / "train.py"), "-c", str(CONFIGS / "digits.yaml"),
               str(CONFIGS / "Ours_LR_Momentum.yaml"), "-q", "--set", "hyperparameter_steps=300",
               "checkpoint_every=5", "device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command + ["--run-dir", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)
    victim = subprocess.Popen(command + ["--run-dir", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "results.json").exists(), "killed too late to test resume"
    subprocess.run(command + ["--run-dir", str(tmp_path / "killed")], check=True, env=env,
                   capture_output=True)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert final_state(resumed) == final_state(whole)


def as_written_before_the_counters_moved_into_the_state(path):
    """Rewrite a checkpoint in the layout it had when the step counters were
    ints beside the state (``{"state", "samplers", "hyperparameter_step",
    "weight_step"}``); returns them."""
    saved = checkpoints.read(path, str(path))
    trainer = saved["trainer"]
    state = dict(trainer["state"])
    counters = {key: int(state.pop(key)) for key in ("hyperparameter_step", "weight_step")}
    saved["trainer"] = {**trainer, "state": state, **counters}
    checkpoints.write(path, saved)
    return counters


@pytest.mark.parametrize("layout", ["current", "counters_beside_the_state"])
def test_save_then_load_continues_the_same_run(layout, tmp_path):
    """Also from a checkpoint written before the step counters moved into the
    state: it resumes unchanged."""
    sources = [CONFIGS / "digits.yaml", CONFIGS / "DiffThroughOpt.yaml"]
    whole = train.main(sources, {"hyperparameter_steps": 8, "device": "cpu"},
                       log_root=tmp_path, progress=False)
    saved = tmp_path / "half.pt"
    train.main(sources, {"hyperparameter_steps": 4, "device": "cpu"}, log_root=tmp_path,
               save=saved, progress=False)
    state = checkpoints.read(saved, "half.pt")  # torch.load(weights_only=True), checksummed
    assert state["config"]["algorithm"] == "DiffThroughOpt"  # the config travels with it
    if layout == "counters_beside_the_state":
        assert as_written_before_the_counters_moved_into_the_state(saved) == {
            "hyperparameter_step": 4, "weight_step": 40}
    continued = train.main(sources, {"hyperparameter_steps": 8, "device": "cpu"},
                           log_root=tmp_path, load=saved, progress=False)
    assert final_state(continued) == final_state(whole)
    assert continued["hyperparameter_steps_done"] == 8


@pytest.mark.parametrize("entry", ["run", "population"])
def test_the_loops_read_the_step_counters_when_they_start_and_end_not_per_step(
        entry, tmp_path, monkeypatch):
    """The counters are device tensors in the state; reading one waits for the
    device, so the loops count the steps they ask for themselves."""
    import population
    from engine import Trainer
    reads = []
    for name in ("hyperparameter_step", "weight_step"):
        counted = property(lambda self, read=getattr(Trainer, name).fget:
                           reads.append(1) or read(self))
        monkeypatch.setattr(Trainer, name, counted)
        monkeypatch.setattr(population.Member, name, counted)
    sources = [CONFIGS / "digits.yaml", CONFIGS / "Ours_LR.yaml"]

    def reads_in_a_run_of(steps):
        reads.clear()
        settings = {"hyperparameter_steps": steps, "log_interval": 10, "device": "cpu"}
        if entry == "run":
            train.main(sources, settings, log_root=tmp_path, progress=False)
        else:
            population.main(sources, [{"overrides": {**settings, "seed": seed}}
                                      for seed in (1, 2)], log_root=tmp_path, progress=False)
        return len(reads)

    assert reads_in_a_run_of(2) == reads_in_a_run_of(12)


def test_run_directories_are_unique_and_hold_the_resolved_config(tmp_path):
    first = train.make_run_dir(tmp_path, "group", "name")
    second = train.make_run_dir(tmp_path, "group", "name")
    assert first != second and first.parent == second.parent == tmp_path / "group"
    results = train.main([CONFIGS / "digits.yaml", CONFIGS / "Random.yaml"],
                         ["hyperparameter_steps=2", "network_weight.momentum=1.5"],
                         log_root=tmp_path, group="g", name="n", progress=False)
    saved = config.read_yaml(Path(results["run_dir"]) / "config.yaml")
    assert saved["network_weight"] == {"class": "SGD", "lr": -1.5, "weight_decay": -5.0,
                                       "momentum": 1.5}
    assert Path(results["run_dir"]).name.endswith("-n")


def test_later_files_and_overrides_win_and_mappings_merge(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("network_weight: {lr: -2.0}\nbatch_size: 7\n")
    cfg = config.load([CONFIGS / "uci_energy.yaml", CONFIGS / "Ours_LR.yaml", extra],
                      ["batch_size=9", "network_weight.momentum=0.25"])
    assert cfg["network_weight"] == {"class": "SGD", "lr": -2.0, "weight_decay": -16.0,
                                     "momentum": 0.25}
    assert cfg["batch_size"] == 9
    assert cfg["optimised_hyperparameters"] == ["lr", "weight_decay"]
    assert cfg.origin("network_weight.lr") == str(extra)
    assert cfg.origin("network_weight.weight_decay") == str(CONFIGS / "uci_energy.yaml")


def test_the_papers_config_dicts_layout_is_accepted(tmp_path):
    paper_init = tmp_path / "iteration_10.yaml"
    paper_init.write_text("config_dicts:\n  network_weight:\n    lr: -2.75\n"
                          "    momentum: 0.9\n    weight_decay: -5.85\n")
    cfg = config.load([CONFIGS / "digits.yaml", CONFIGS / "Random.yaml", paper_init])
    assert cfg["network_weight"]["lr"] == -2.75 and cfg["network_weight"]["class"] == "SGD"


@pytest.mark.parametrize("fused", [False, True], ids=["lstm_cells", "nn_LSTM"])
def test_language_model_trains_with_implicit_hypergradients(tmp_path, fused):
    """Ours_LR_Momentum on a tiny Penn-Treebank-format corpus with the LSTM
    language model (tied weights, dropout): the twin model used for the
    validation gradient must share the tied parameters and run dropout."""
    folder = tmp_path / "penn_treebank"
    folder.mkdir()
    words = "the cat sat on the mat and the dog ran to the cat".split()
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=generator))
             for _ in range(60)]
    (folder / "ptb.train.txt").write_text("\n".join(lines[:40]) + "\n")
    (folder / "ptb.valid.txt").write_text("\n".join(lines[40:50]) + "\n")
    (folder / "ptb.test.txt").write_text("\n".join(lines[50:]) + "\n")

    def run(hyperparameter_steps):
        return train.main(
            [CONFIGS / "penn_treebank.yaml", CONFIGS / "Ours_LR_Momentum.yaml"],
            {"data_root": str(tmp_path), "dataset.sequence_length": 6, "batch_size": 8,
             "model.embedding_size": 16, "model.hidden_size": 16, "model.fused": fused,
             "network_weight.lr": -0.5, "hyperparameter_steps": hyperparameter_steps,
             "network_weight_steps": 5, "log_interval": 10, "device": "cpu"},
            log_root=tmp_path / "runs", progress=False)

    untrained, results = run(0), run(4)
    assert results["status"] == "finished"
    assert math.isfinite(results["final"]["Loss/Test"])
    assert results["final"]["Loss/Training"] < untrained["final"]["Loss/Training"] - 0.05
    assert results["hyperparameters"]["lr"] != pytest.approx(10 ** -0.5, rel=1e-3)


def test_tracker_writes_every_value_at_its_step(tmp_path):
    """Scalars of mixed dtypes share one event per step; TensorBoard's reader
    gives each tag its own series back, in order, with the right values."""
    from tracking import Tracker
    tracker = Tracker(tmp_path)
    written = {"Loss/Training": [], "Accuracy/Test": [], "Hypergradient/Lr": []}
    for step in range(1, 6):
        values = {"Loss/Training": torch.tensor(1.0 / step),
                  "Accuracy/Test": torch.tensor(0.5 + step / 100, dtype=torch.float64),
                  "Hypergradient/Lr": -0.25 * step}
        for tag, value in values.items():
            tracker.scalar(tag, value, step)
            written[tag].append(float(value))
        if step % 2 == 0:
            latest = tracker.flush()
            assert latest["Hypergradient/Lr"] == -0.25 * step
    tracker.close()
    logged = scalars(tmp_path)
    for tag, values in written.items():
        events = logged.Scalars(tag)
        assert [event.step for event in events] == [1, 2, 3, 4, 5]
        assert [event.value for event in events] == pytest.approx(values, rel=1e-7)
