"""Populations of teaching runs over seeds (``train.py --population N`` with a
``teaching`` config): each member, in float64, gives what the same run gives
alone (results, teacher file, logs), including a member resumed from its own
checkpoint; what cannot run as a population is refused in one line."""
import json
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import optimisers
import population
import processes
import train
from commentaries import TEACHERS, example_weighting, storage
from commentaries.loop import PureTeachingMethod
from errors import UserError
from test_resume_logs import next_second, preempt_after

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DATA = str(CONFIGS / "digits_teaching.yaml")

TINY = {
    "Commentary_ExampleWeighting": [
        "teaching.teacher_steps=6", "teaching.inner_steps=3", "teaching.teacher_width=4",
        "teaching.objective_seeds=1", "teaching.student={class: MLP, hidden: [8]}",
        "teaching.evaluation_students=[{class: MLP, hidden: [8]}]", "teaching.evaluation_steps=2",
        "teaching.log_interval=2", "teaching.chunk_size=2"],
    "GTN_Curriculum": [
        "teaching.outer_steps=6", "teaching.inner_steps=3", "teaching.batch_size=20",
        "teaching.real_batch_size=64", "teaching.eval_learners=1", "teaching.shuffles=1",
        "teaching.log_interval=2", "teaching.transfer_learners=[]", "teaching.truncation=2"],
    "GTN_RealDataBaseline": [
        "teaching.outer_steps=4", "teaching.inner_steps=2", "teaching.eval_learners=1",
        "teaching.log_interval=2"],
}
FLOAT64 = ["device=cpu", "dtype=float64"]


def sources(algorithm):
    return [DATA, str(CONFIGS / f"{algorithm}.yaml")]


def assert_same_numbers(member, alone, rtol=1e-10):
    """Equal up to float64 rounding (vmap's batched kernels add in another order)."""
    if isinstance(alone, dict):
        assert member.keys() == alone.keys()
        for key in alone:
            assert_same_numbers(member[key], alone[key], rtol)
    elif isinstance(alone, float):
        assert member == pytest.approx(alone, rel=rtol, abs=1e-12)
    else:
        assert member == alone


def assert_member_is_the_run_alone(member_dir, alone_dir):
    member, alone = (json.loads((d / "results.json").read_text()) for d in (member_dir, alone_dir))
    assert member["status"] == alone["status"] == "finished" and member["seed"] == alone["seed"]
    for key in ("outer_steps_done", "final", "objective", "teaching", "hyperparameters", "dataset"):
        assert_same_numbers(member[key], alone[key])
    if alone["teacher_file"]:
        tensors = [storage.load_teacher(d / "teacher.pt")["tensors"] for d in (member_dir, alone_dir)]
        assert tensors[0].keys() == tensors[1].keys()
        for name in tensors[1]:
            torch.testing.assert_close(tensors[0][name], tensors[1][name], rtol=1e-10, atol=1e-12)
    logs = [EventAccumulator(str(d), size_guidance={"scalars": 0}).Reload() for d in (member_dir, alone_dir)]
    tags = [tag for tag in logs[1].Tags()["scalars"] if tag.startswith(("Loss/", "Hyperparameter/"))]
    assert tags and set(tags) <= set(logs[0].Tags()["scalars"])
    for tag in tags:
        assert [e.step for e in logs[0].Scalars(tag)] == [e.step for e in logs[1].Scalars(tag)]
        assert [e.value for e in logs[0].Scalars(tag)] == pytest.approx(
            [e.value for e in logs[1].Scalars(tag)], rel=1e-6)  # summaries are float32
    return member


@pytest.mark.parametrize("algorithm", sorted(TINY))
def test_population_members_equal_the_same_runs_alone(tmp_path, algorithm, capsys):
    settings = TINY[algorithm] + FLOAT64
    status = train.cli(["-c", *sources(algorithm), "--population", "2", "--seed", "3", "-q",
                        "-l", str(tmp_path / "population"), "--set", *settings])
    assert status == 0
    assert "population of 2: 2 finished" in capsys.readouterr().out
    members = sorted((tmp_path / "population").rglob("results.json"))
    assert len(members) == 2
    objectives = []
    for path in members:
        seed = json.loads(path.read_text())["seed"]
        alone = tmp_path / f"alone{seed}"
        train.main(sources(algorithm), settings + [f"seed={seed}"], run_dir=alone, progress=False)
        member = assert_member_is_the_run_alone(path.parent, alone)
        assert (path.parent / "config.yaml").is_file() and not (path.parent / "checkpoint.pt").exists()
        objectives.append(member["objective"])
    assert sorted(json.loads(p.read_text())["seed"] for p in members) == [3, 4]
    assert objectives[0] != objectives[1]  # different seeds, different runs


def test_a_member_resumes_from_its_checkpoint_beside_a_fresh_one(tmp_path, monkeypatch):
    """Member 0 was killed after its checkpoint at step 2; the population
    resumes it (its own step group) beside a fresh member 1, and both give
    what their runs alone give."""
    algorithm = "Commentary_ExampleWeighting"
    settings = TINY[algorithm] + FLOAT64 + ["checkpoint_every=2"]
    original = example_weighting.ExampleWeighting.outer_step

    def killed_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(example_weighting.ExampleWeighting, "outer_step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(sources(algorithm), settings + ["seed=0"], run_dir=tmp_path / "member0", progress=False)
    monkeypatch.setattr(example_weighting.ExampleWeighting, "outer_step", original)
    members = [{"overrides": settings + [f"seed={seed}"], "run_dir": str(tmp_path / f"member{seed}")}
               for seed in (0, 1)]
    results = population.main(sources(algorithm), members, progress=False)
    assert [r["resumed_from_step"] for r in results] == [2, 0]
    for seed in (0, 1):
        train.main(sources(algorithm), settings + [f"seed={seed}"], run_dir=tmp_path / f"alone{seed}",
                   progress=False)
        assert_member_is_the_run_alone(tmp_path / f"member{seed}", tmp_path / f"alone{seed}")


def test_methods_that_cannot_are_refused_in_one_line_naming_the_key(tmp_path, capsys):
    auxilearn = [DATA, str(CONFIGS / "AuxiLearn_Linear.yaml")]
    with pytest.raises(SystemExit) as exit_status:
        train.cli(["-c", *auxilearn, "--population", "2", "-l", str(tmp_path), "--set", "device=cpu"])
    error = capsys.readouterr().err.strip()
    assert exit_status.value.code == 2 and "\n" not in error
    assert "AuxiLearn_Linear.yaml: teaching.class: AuxiLearn does not run as a population" in error
    assert not list(tmp_path.rglob("results.json"))
    assert population.refusal(sources("GTN_Curriculum"), {"device": "cpu"}) is None
    assert population.refusal(sources("Commentary_ExampleWeighting"), {"device": "cpu"}) is None
    members = [{"overrides": TINY["GTN_Curriculum"] + [f"seed={seed}", f"teaching.inner_lr={lr}"]}
               for seed, lr in ((0, 0.2), (1, 0.3))]
    with pytest.raises(UserError, match="^--set: teaching.inner_lr: members of a teaching population "
                                        "may differ only in seed"):
        population.main(sources("GTN_Curriculum"), members, log_root=tmp_path, progress=False)


def test_parallel_exec_packs_teaching_seeds_into_a_population(tmp_path):
    import parallel_exec
    status = parallel_exec.main(["-c", DATA, "--algorithms", "GTN_RealDataBaseline", "--repetitions", "2",
                                 "--generator", "iteration_id", "--workers", "1", "--population-size", "2",
                                 "-l", str(tmp_path), "-g", "teach", "--no-progress", "--set",
                                 *TINY["GTN_RealDataBaseline"], "device=cpu"])
    assert status == 0
    summary = json.loads((tmp_path / "teach" / "summary.json").read_text())
    assert summary["counts"] == {"finished": 2} and len(summary["populations"]) == 1
    assert not summary.get("not_vectorised")
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.rglob("results.json"))]
    assert [r["seed"] for r in results] == [0, 1] and results[0]["objective"] != results[1]["objective"]


@TEACHERS.register("ToyPureTeacher")
class ToyPureTeacher(PureTeachingMethod):
    """A scalar teacher ``c`` moved by the core's outer SGD towards a target
    drawn per step from the run's generator: one registration, and it runs
    alone and as a population."""

    def __init__(self, *, context, steps=6, lr=0.2, log_interval=2):
        self.context, self.steps, self.lr, self.log_interval = context, steps, lr, log_interval
        self.dataset_name = "none"

    def setup(self):
        self.rng = torch.Generator().manual_seed(self.context.seed)
        self.optimiser = optimisers.HYPERPARAMETER_OPTIMISERS.get("SGD")(lr=self.lr)
        self.state = {"c": torch.zeros((), dtype=torch.float64)}

    def checkpointed(self):
        return {"state": self.state, "rng": self.rng}

    def outer_state(self):
        return self.state

    def load_outer_state(self, state):
        self.state = state

    def outer_inputs(self, step):
        return {"target": torch.rand((), generator=self.rng, dtype=torch.float64)}

    def pure_outer_step(self, state, inputs):
        loss, grad = torch.func.grad_and_value(lambda c: (c - inputs["target"]) ** 2)(state["c"])[::-1]
        return self.optimiser.update(state, {"c": grad}, {})[0], {"Loss/Training": loss}

    def finish(self, steps_done):
        c = float(self.state["c"])
        return {"final": {"Loss/Validation": (c - 0.5) ** 2}, "teaching": {"c": c}}


def test_a_registered_pure_toy_method_runs_as_a_population_with_no_other_edit(tmp_path):
    config = {"algorithm": "Toy", "teaching": {"class": "ToyPureTeacher"}}
    members = [{"overrides": {"seed": seed}, "run_dir": str(tmp_path / f"member{seed}")} for seed in (0, 1)]
    together = population.main(config, members, progress=False)
    for seed, member in zip((0, 1), together):
        alone = train.main(config, {"seed": seed}, run_dir=tmp_path / f"alone{seed}", progress=False)
        assert member["teaching"]["c"] == pytest.approx(alone["teaching"]["c"], rel=1e-14)
        assert member["objective"] == pytest.approx(alone["objective"], rel=1e-14)
    assert together[0]["teaching"]["c"] != together[1]["teaching"]["c"]


def test_a_preempted_population_saves_every_member_and_resumes_to_the_runs_alone(tmp_path):
    """SLURM's preemption stops a teaching population at its next outer step
    with every member's state saved (each in its own random stream); the
    requeued population resumes them, and each ends as its run alone."""
    algorithm = "GTN_Curriculum"
    settings = [item for item in TINY[algorithm] if not item.startswith("teaching.outer_steps")]
    settings += FLOAT64 + ["teaching.outer_steps=30"]
    members = [{"overrides": settings + [f"seed={seed}"], "run_dir": str(tmp_path / f"member{seed}")}
               for seed in (0, 1)]
    requester = preempt_after(lambda: any((tmp_path / "member1").glob("events.out.tfevents.*")))
    try:
        with pytest.raises(processes.Preempted, match="preempted at outer step"):
            population.main(sources(algorithm), members, progress=False)
    finally:
        requester.join(10)
        processes.preemption.reset()
    steps = [checkpoints.read(tmp_path / f"member{seed}" / "checkpoint.pt", "checkpoint")["step"]
             for seed in (0, 1)]
    assert steps[0] == steps[1] and 0 < steps[0] < 30
    next_second()
    results = population.main(sources(algorithm), members, progress=False)
    assert [r["resumed_from_step"] for r in results] == steps
    for seed in (0, 1):
        train.main(sources(algorithm), settings + [f"seed={seed}"], run_dir=tmp_path / f"alone{seed}",
                   progress=False)
        assert_member_is_the_run_alone(tmp_path / f"member{seed}", tmp_path / f"alone{seed}")
