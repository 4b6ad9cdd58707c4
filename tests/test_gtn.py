"""Generative Teaching Networks: hypergradients against finite differences,
learning on the embedded digits, the curriculum check, plots and logs."""
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import commentaries
from commentaries import gtn, storage
from commentaries.loop import Context
from errors import UserError
from commentaries.common import reset_weights
from models import MLP


def run_gtn(run_dir, seed=0, **options):
    torch.manual_seed(seed)
    pathlib.Path(run_dir).mkdir(parents=True, exist_ok=True)
    return commentaries.run({"class": "GTN", **options}, Context(run_dir=pathlib.Path(run_dir), seed=seed))


def tiny_problem(steps=3):
    """A float64 GTN small enough for finite differences on every teacher
    tensor: ``hypergradient(learned, **modes)`` through the core's
    ``hypergradients.unrolled`` and the plain ``loss(learned)``."""
    torch.manual_seed(0)
    classes, shape, noise_size, batch = 3, (1, 2, 2), 2, 4
    generator = gtn.Generator(noise_size, classes, shape, hidden_size=5).double()
    learned = {f"generator.{name}": p.detach() for name, p in generator.named_parameters()}
    learned.update(inputs=torch.randn(steps, batch, noise_size, dtype=torch.float64),
                   log_lr=torch.tensor(-0.5, dtype=torch.float64))
    fixed = {"labels": gtn.balanced_labels(steps, batch, classes)}
    learner = MLP(hidden=[8], input_shape=shape, output_size=classes).double()
    init = reset_weights(learner, torch.Generator().manual_seed(1), dtype=torch.float64)
    real = torch.rand(6, *shape, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])

    def hypergradient(learned, **modes):
        return gtn.meta_hypergradient(generator, learner, init, learned, fixed, 0.5, real, **modes)

    def loss(learned):
        return float(gtn.meta_loss(generator, learner, init, {**fixed, **learned}, 0.5, real))

    return hypergradient, loss, learned


def central_difference(loss, learned, name, index, epsilon=1e-6):
    values = []
    for shift in (epsilon, -epsilon):
        bumped = learned[name].clone()
        bumped.view(-1)[index] += shift
        values.append(loss({**learned, name: bumped}))
    return (values[0] - values[1]) / (2 * epsilon)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["full", "chunks2"])
def test_unrolled_hypergradient_matches_finite_differences(chunk_size):
    hypergradient, loss, learned = tiny_problem()
    result = hypergradient(learned, chunk_size=chunk_size)
    assert float(result.value) == pytest.approx(loss(learned), rel=1e-12)
    checked = 0
    for name, tensor in learned.items():
        grad = result.gradient[name]
        for index in torch.linspace(0, tensor.numel() - 1, min(tensor.numel(), 5)).long().tolist():
            expected = central_difference(loss, learned, name, index)
            assert grad.reshape(-1)[index].item() == pytest.approx(expected, rel=1e-5, abs=1e-8)
            checked += 1
    assert checked >= 30 and all(g.abs().max() > 1e-5 for g in result.gradient.values())  # every part gets signal


def test_truncation_over_all_steps_is_the_full_gradient_and_shorter_windows_differ():
    hypergradient, _, learned = tiny_problem(steps=4)
    full = hypergradient(learned).gradient
    window = hypergradient(learned, truncation=4).gradient
    for name in full:
        torch.testing.assert_close(full[name], window[name])
    inputs_grad = hypergradient(learned, truncation=1).gradient["inputs"]
    assert torch.all(inputs_grad[:3] == 0) and inputs_grad[3].abs().max() > 0


SMALL = dict(inner_steps=4, batch_size=20, real_batch_size=128, inner_lr=0.5, eval_learners=2,
             shuffles=2, log_interval=10)


def test_learned_curriculum_lowers_outer_objective_and_logs(tmp_path):
    initial = run_gtn(tmp_path / "init", outer_steps=0, **SMALL)
    trained = run_gtn(tmp_path / "trained", outer_steps=60, **SMALL)
    assert trained["status"] == "finished" and trained["outer_steps_done"] == 60
    assert initial["objective"] > 2.0  # untrained generator: near-chance learners
    assert trained["objective"] < 0.75 * initial["objective"]
    assert trained["final"]["Accuracy/Test"] > initial["final"]["Accuracy/Test"] + 0.3
    final = trained["final"]
    assert final["Accuracy/Shuffle_Drop"] == pytest.approx(
        final["Accuracy/Test"] - final["Accuracy/Test_Shuffled_Order"])
    assert trained["objective"] == final["Loss/Validation"]
    saved = storage.load_teacher(tmp_path / "trained" / "teacher.pt", method="GTN")
    assert saved["teacher"]["input"] == "learned" and saved["tensors"]["inputs"].shape == (4, 20, 16)
    for png in ("generated_samples.png", "inner_step_accuracy.png"):
        assert (tmp_path / "trained" / png).stat().st_size > 1000
    events = EventAccumulator(str(tmp_path / "trained"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    validation = events.Scalars("Loss/Validation")
    assert [event.step for event in validation] == [10, 20, 30, 40, 50, 60]
    assert validation[-1].value < validation[0].value
    assert {"Commentary/generated_samples", "Commentary/inner_step_accuracy"} <= set(events.Tags()["images"])
    assert events.Scalars("Final/Loss/Validation")[-1].value == pytest.approx(trained["objective"], rel=1e-6)

    # The saved teacher trains a fresh student of another architecture through TrainWithCommentary,
    # on its generated batches alone; the untrained generator's batches teach next to nothing.
    def student_accuracy(name):
        reuse = {"class": "TrainWithCommentary", "commentary": str(tmp_path / name / "teacher.pt"),
                 "student": {"class": "CNN", "width": 8}, "steps": 40, "lr": 0.01, "log_interval": 20}
        context = Context(run_dir=tmp_path / f"{name}_student")
        results = commentaries.run(reuse, context)
        assert results["teaching"]["teacher"]["method"] == "GTN" and results["dataset"] == "Digits"
        return results["final"]["Accuracy/Test"]

    taught, untaught = student_accuracy("trained"), student_accuracy("init")
    assert taught > 0.6 and taught > untaught + 0.3, (taught, untaught)


def test_fresh_noise_and_real_data_baselines_run(tmp_path):
    noise = run_gtn(tmp_path / "n", input="noise", outer_steps=12, **SMALL)
    assert "Accuracy/Shuffle_Drop" not in noise["final"]  # fresh noise has no order to shuffle
    assert noise["objective"] < 2.29  # chance level is ln 10 = 2.30
    real = run_gtn(tmp_path / "r", input="real", outer_steps=12, **SMALL)
    assert real["status"] == "finished" and not (tmp_path / "r" / "generated_samples.png").exists()


def test_fixed_input_is_not_learned_and_shuffled_batches_are_a_permutation():
    rng = torch.Generator().manual_seed(0)
    teacher = gtn.Teacher("fixed", 4, 10, (1, 8, 8), 16, 5, 10, 0.1, True, rng, torch.device("cpu"))
    assert "inputs" not in teacher.learned() and torch.equal(teacher.fixed()["inputs"], teacher.inputs)
    order = torch.tensor([4, 2, 0, 1, 3])
    images, _ = teacher.batches(None, None)
    shuffled, labels = teacher.batches(None, None, order=order)
    torch.testing.assert_close(shuffled, images[order])
    assert torch.equal(labels, teacher.labels[order])


@pytest.mark.parametrize("options, key", [
    ({"input": "learnt"}, "teaching.input"),
    ({"inner_steps": 0}, "teaching.inner_steps"),
    ({"inner_lr": -1.0}, "teaching.inner_lr"),
    ({"truncation": 9, "inner_steps": 3}, "teaching.truncation"),
    ({"data": {"class": "Diabetes"}}, "teaching.data"),  # a regression set: nothing to teach a classifier
    ({"learner": {"class": "ResNet"}}, "teaching.learner"),
])
def test_bad_options_are_user_errors(tmp_path, options, key):
    with pytest.raises(UserError, match=key):
        run_gtn(tmp_path, **options)


# ----------------------------------------------------------------------------- end to end

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = {"teaching.outer_steps": 2, "teaching.inner_steps": 2, "teaching.log_interval": 1,
        "teaching.eval_learners": 1, "teaching.shuffles": 1, "device": "cpu"}


@pytest.mark.parametrize("algorithm", ["GTN_Curriculum", "GTN_FixedInput", "GTN_FreshNoise",
                                       "GTN_RealDataBaseline"])
def test_algorithm_files_run_through_train_main(tmp_path, algorithm):
    import train
    results = train.main([ROOT / "configs" / "digits_teaching.yaml", ROOT / "configs" / f"{algorithm}.yaml"],
                         TINY, log_root=tmp_path, progress=False)
    assert results["status"] == "finished" and results["algorithm"] == algorithm
    assert results["outer_steps_done"] == 2
    assert 0 < results["final"]["Accuracy/Test"] <= 1 and results["objective"] == results["final"]["Loss/Validation"]
    run_dir = pathlib.Path(results["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "results.json").is_file()
    assert (run_dir / "generated_samples.png").exists() == (algorithm != "GTN_RealDataBaseline")


def test_parallel_exec_runs_a_gtn_over_seeds(tmp_path):
    import json
    import parallel_exec
    status = parallel_exec.main(
        ["-c", str(ROOT / "configs" / "digits_teaching.yaml"), "--algorithms", "GTN_Curriculum",
         "--repetitions", "2", "--generator", "iteration_id", "--workers", "1", "-l", str(tmp_path),
         "-g", "seeds", "--no-progress", "--set"] + [f"{key}={value}" for key, value in TINY.items()])
    assert status == 0
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.rglob("results.json"))]
    assert [r["seed"] for r in results] == [0, 1] and all(r["status"] == "finished" for r in results)
    assert results[0]["objective"] != results[1]["objective"]  # different seeds, different runs


def test_truncated_unroll_memory_is_bounded_by_the_window_not_the_unroll_length():
    """Peak allocated bytes (profiler events; ``torch.func`` refuses saved-tensor hooks)."""
    full_short, full_long = gtn.peak_saved_bytes(8), gtn.peak_saved_bytes(32)
    window_short, window_long = gtn.peak_saved_bytes(8, truncation=4), gtn.peak_saved_bytes(32, truncation=4)
    assert full_long > 3 * full_short  # the full unroll keeps every step's graph
    # the window keeps T steps', whatever K (up to the K x B inputs the outer variables hold)
    assert window_long == pytest.approx(window_short, rel=0.1) and window_long < 0.75 * full_short, (
        full_short, full_long, window_short, window_long)


def test_saved_teacher_reloads_bit_for_bit_and_generates_the_same_images(tmp_path):
    rng = torch.Generator().manual_seed(0)
    teacher = gtn.Teacher("learned", 4, 10, (1, 8, 8), 16, 3, 10, 0.1, True, rng, torch.device("cpu"))
    path = storage.save_teacher(tmp_path / "teacher.pt", method="GTN", tensors=gtn.teacher_tensors(teacher))
    payload = storage.load_teacher(path, method="GTN")
    for name, tensor in gtn.teacher_tensors(teacher).items():
        assert torch.equal(payload["tensors"][name], tensor.detach())
    generator = gtn.Generator(4, 10, (1, 8, 8), 16)
    generator.load_state_dict({name.removeprefix("generator."): value
                               for name, value in payload["tensors"].items() if name.startswith("generator.")})
    with torch.no_grad():
        assert torch.equal(gtn.generate(generator, payload["tensors"]["inputs"], payload["tensors"]["labels"]),
                           gtn.generate(teacher.generator, teacher.inputs, teacher.labels))
    with pytest.raises(UserError, match="holds a GTN teacher, not AuxiLearn"):
        storage.load_teacher(path, method="AuxiLearn")


def test_memory_bounded_mode_trains(tmp_path):
    results = run_gtn(tmp_path, outer_steps=3, truncation=2, **{**SMALL, "log_interval": 3})
    assert results["status"] == "finished" and results["hyperparameters"]["lr"] != SMALL["inner_lr"]


def test_a_gtn_teacher_trains_a_fresh_student_through_train_with_commentary(tmp_path):
    """The teacher file a GTN run exports is the one format ``TrainWithCommentary``
    loads: a fresh student of another architecture trains on the generated
    batches (not on real ones: the real-data baseline's teacher, same seed,
    gives another student)."""
    import train
    students = {}
    for algorithm in ("GTN_Curriculum", "GTN_RealDataBaseline"):
        learned = train.main([ROOT / "configs" / "digits_teaching.yaml",
                              ROOT / "configs" / f"{algorithm}.yaml"],
                             TINY, log_root=tmp_path / algorithm, progress=False)
        teacher = pathlib.Path(learned["run_dir"]) / "teacher.pt"
        students[algorithm] = train.main(
            [ROOT / "configs" / "Commentary_TrainWithCommentary.yaml"],
            {"teaching.commentary": str(teacher), "teaching.steps": 6, "teaching.log_interval": 3,
             "teaching.student": {"class": "MLP", "hidden": [16]}, "device": "cpu"},
            log_root=tmp_path / algorithm, progress=False)
    generated = students["GTN_Curriculum"]
    assert generated["status"] == "finished" and generated["dataset"] == "Digits"
    assert generated["teaching"]["teacher"]["learned_by"]["algorithm"] == "unrolled (GTN)"
    assert 0 < generated["final"]["Accuracy/Test"] <= 1
    assert generated["final"]["Loss/Test"] != students["GTN_RealDataBaseline"]["final"]["Loss/Test"]
