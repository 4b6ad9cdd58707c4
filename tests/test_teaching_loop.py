"""The loop every teaching method runs in: one registration adds a method;
logging at intervals (read back with TensorBoard's reader), divergence with
the config's ``divergence_penalty``, checkpoints and bit-for-bit resume
(in process and after ``kill -9``), one teacher file format."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import processes
import train
from commentaries import TEACHERS, storage
from commentaries.loop import TeachingMethod
from errors import UserError
from test_resume_logs import next_second, preempt_after

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@TEACHERS.register("ToyQuadraticTeacher")
class ToyQuadraticTeacher(TeachingMethod):
    """The smallest teaching method: a scalar teacher ``c`` learned by SGD on
    ``(c - target)²``. Registering it is all it takes to run it through
    ``train.py``; nothing else lists the methods."""

    def __init__(self, *, context, steps=20, lr=0.1, target=3.0, log_interval=5):
        self.context, self.steps, self.lr, self.target, self.log_interval = context, steps, lr, target, log_interval
        self.dataset_name = "none"

    def setup(self):
        self.c = torch.zeros((), dtype=torch.float64, requires_grad=True)
        self.optimiser = torch.optim.SGD([self.c], lr=self.lr)

    def checkpointed(self):
        return {"c": self.c, "optimiser": self.optimiser}

    def outer_step(self, step):
        loss = (self.c - self.target) ** 2
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        return {"Loss/Training": loss.detach()}

    def evaluate(self, step):
        return {"Teacher/C": self.c.detach()}

    def finish(self, steps_done):
        c = self.c.item()
        return {"final": {"Loss/Validation": (c - self.target) ** 2}, "teaching": {"c": c}}

    def export(self):
        return {"tensors": {"c": self.c}, "learned_by": {"algorithm": "gradient descent"}}


def toy(**options):
    return {"algorithm": "Toy", "teaching": {"class": "ToyQuadraticTeacher", **options}}


def test_a_registered_toy_method_runs_through_train_with_logs_results_and_teacher_file(tmp_path):
    results = train.main(toy(steps=20, lr=0.1), log_root=tmp_path, progress=False)
    # c_k = 3 (1 - 0.8^k): each step multiplies the error by 1 - 2 lr = 0.8
    assert results["status"] == "finished" and results["outer_steps_done"] == 20
    assert results["objective"] == pytest.approx((3 * 0.8 ** 20) ** 2, rel=1e-12)
    assert results["teaching"]["c"] == pytest.approx(3 * (1 - 0.8 ** 20), rel=1e-12)
    run_dir = pathlib.Path(results["run_dir"])
    assert json.loads((run_dir / "results.json").read_text())["objective"] == results["objective"]
    assert set(results) >= {"status", "dataset", "outer_steps_done", "final", "objective", "teaching",
                            "hyperparameters", "teacher_file", "wall_time_s", "algorithm", "seed", "run_dir"}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    training = events.Scalars("Loss/Training")
    assert [e.step for e in training] == [5, 10, 15, 20]
    for event in training:  # the mean of the interval's step losses (3 · 0.8^k)², k = step-5 .. step-1
        expected = sum((3 * 0.8 ** k) ** 2 for k in range(event.step - 5, event.step)) / 5
        assert event.value == pytest.approx(expected, rel=1e-6)
    assert [e.value for e in events.Scalars("Teacher/C")] == pytest.approx(
        [3 * (1 - 0.8 ** step) for step in (5, 10, 15, 20)], rel=1e-6)
    assert events.Scalars("Final/Loss/Validation")[-1].value == pytest.approx(results["objective"], rel=1e-6)
    payload = storage.load_teacher(results["teacher_file"], method="ToyQuadraticTeacher")
    assert payload["tensors"]["c"].item() == results["teaching"]["c"]


def test_divergence_stops_the_run_with_the_configured_penalty(tmp_path):
    results = train.main(toy(steps=50, lr=1e100), {"divergence_penalty": 123.0}, log_root=tmp_path,
                         progress=False)
    assert results["status"] == "diverged" and results["objective"] == 123.0
    assert results["outer_steps_done"] == 5 and results["final"] == {} and results["teacher_file"] is None
    auxilearn = train.main([CONFIGS / "digits_teaching.yaml", CONFIGS / "AuxiLearn_Linear.yaml"],
                           {"teaching.steps": 40, "teaching.log_interval": 5, "teaching.lr": 1.0e6,
                            "divergence_penalty": 77.0, "device": "cpu"}, log_root=tmp_path, progress=False)
    assert auxilearn["status"] == "diverged" and auxilearn["objective"] == 77.0
    assert auxilearn["outer_steps_done"] < 40


def test_interrupted_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    settings = {"checkpoint_every": 4}
    whole = train.main(toy(steps=20, lr=0.05), settings, run_dir=tmp_path / "whole", progress=False)
    original = ToyQuadraticTeacher.outer_step

    def die_at_13(self, step):
        if step == 13:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(ToyQuadraticTeacher, "outer_step", die_at_13)
    with pytest.raises(KeyboardInterrupt):
        train.main(toy(steps=20, lr=0.05), settings, run_dir=tmp_path / "killed", progress=False)
    assert checkpoints.read(tmp_path / "killed" / "checkpoint.pt", "checkpoint")["step"] == 12
    monkeypatch.setattr(ToyQuadraticTeacher, "outer_step", original)
    resumed = train.main(toy(steps=20, lr=0.05), settings, run_dir=tmp_path / "killed", progress=False)
    assert resumed["resumed_from_step"] == 12 and whole["resumed_from_step"] == 0
    assert resumed["teaching"]["c"] == whole["teaching"]["c"] and resumed["final"] == whole["final"]
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    logs = [EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0}).Reload().Scalars("Loss/Training")
            for name in ("whole", "killed")]
    assert [e.step for e in logs[1]] == [5, 10, 15, 20]  # no step logged twice
    assert [e.value for e in logs[1]] == [e.value for e in logs[0]]  # interval 10-15 spans the checkpoint at 12


def test_a_broken_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02 truncated")
    with pytest.raises(UserError, match="checkpoint.pt: refused by torch.load"):
        train.main(toy(), run_dir=tmp_path, progress=False)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="checkpoint.pt: not a hypergrad checkpoint"):
        train.main(toy(), run_dir=tmp_path, progress=False)
    checkpoints.write(tmp_path / "checkpoint.pt", {"weights": torch.zeros(2)})
    with pytest.raises(UserError, match="checkpoint.pt: not a teaching checkpoint"):
        train.main(toy(), run_dir=tmp_path, progress=False)


KILLED = {
    "Commentary_ExampleWeighting": ["teaching.teacher_steps=60", "teaching.inner_steps=3",
                                    "teaching.teacher_width=4", "teaching.objective_seeds=1",
                                    "teaching.student={class: MLP, hidden: [8]}",
                                    "teaching.evaluation_students=[{class: MLP, hidden: [8]}]",
                                    "teaching.evaluation_steps=2", "teaching.log_interval=10",
                                    "checkpoint_every=3"],
    "GTN_Curriculum": ["teaching.outer_steps=40", "teaching.inner_steps=3", "teaching.batch_size=20",
                       "teaching.real_batch_size=64", "teaching.eval_learners=1", "teaching.shuffles=1",
                       "teaching.log_interval=10", "teaching.transfer_learners=[]", "checkpoint_every=3"],
    "AuxiLearn_Linear": ["teaching.steps=200", "teaching.warmup_steps=20", "teaching.update_every=5",
                         "teaching.log_interval=50", "checkpoint_every=10"],
}


@pytest.mark.parametrize("algorithm", sorted(KILLED))
def test_sigkilled_teaching_run_resumes_bit_for_bit(tmp_path, algorithm):
    """A real kill -9 of ``train.py ... --run-dir D`` after a checkpoint, then
    the same run again on D (in this process, to spare a second start-up)."""
    settings = KILLED[algorithm] + ["device=cpu"]
    sources = [CONFIGS / "digits_teaching.yaml", CONFIGS / f"{algorithm}.yaml"]
    whole = train.main(sources, settings, run_dir=tmp_path / "whole", progress=False)
    command = [sys.executable, str(ROOT / "train.py"), "-c", *map(str, sources), "-q",
               "--run-dir", str(tmp_path / "killed"), "--set", *settings]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "results.json").exists(), "killed too late to test resume"
    next_second()
    assert_resumes_to_the_whole_run(sources, settings, tmp_path / "killed", tmp_path / "whole", whole)


def assert_resumes_to_the_whole_run(sources, settings, run_dir, whole_dir, whole):
    """The interrupted run in ``run_dir``, resumed (in this process) from its
    checkpoint, ends as the uninterrupted one: results, teacher file and logs."""
    step = checkpoints.read(run_dir / "checkpoint.pt", "checkpoint")["step"]
    train.main(sources, settings, run_dir=run_dir, progress=False)  # the same run, resumed
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["resumed_from_step"] == step > 0
    for key in ("status", "outer_steps_done", "final", "objective", "teaching", "hyperparameters"):
        assert resumed[key] == whole[key], key
    saved, again = (storage.load_teacher(path / "teacher.pt")["tensors"] for path in (whole_dir, run_dir))
    assert saved.keys() == again.keys() and all(torch.equal(saved[name], again[name]) for name in saved)
    logs = [EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload() for path in (whole_dir, run_dir)]
    tags = [tag for tag in logs[0].Tags()["scalars"] if tag.startswith("Loss/")]
    assert tags
    for tag in tags:  # the interrupted run's events after its checkpoint are purged
        assert [(e.step, e.value) for e in logs[1].Scalars(tag)] == [(e.step, e.value) for e in logs[0].Scalars(tag)]


@pytest.mark.parametrize("algorithm", ["Commentary_ExampleWeighting", "GTN_Curriculum"])
def test_preempted_teaching_run_saves_its_step_and_resumes_bit_for_bit(tmp_path, algorithm):
    """SLURM's preemption (``processes.preemption``, as the executor's signal
    handler asks for it) stops a teaching run at its next outer step with its
    state saved, no periodic checkpoint needed; resumed, it ends as the run
    never interrupted."""
    settings = [item for item in KILLED[algorithm] if not item.startswith("checkpoint_every")]
    settings += ["device=cpu", "checkpoint_every=0"]
    sources = [CONFIGS / "digits_teaching.yaml", CONFIGS / f"{algorithm}.yaml"]
    whole = train.main(sources, settings, run_dir=tmp_path / "whole", progress=False)
    run_dir = tmp_path / "preempted"
    requester = preempt_after(lambda: any(run_dir.glob("events.out.tfevents.*")))
    try:
        with pytest.raises(processes.Preempted, match="preempted at outer step"):
            train.main(sources, settings, run_dir=run_dir, progress=False)
    finally:
        requester.join(10)
        processes.preemption.reset()
    assert not (run_dir / "results.json").exists()
    next_second()
    assert_resumes_to_the_whole_run(sources, settings, run_dir, tmp_path / "whole", whole)


def test_train_with_commentary_refuses_teachers_it_cannot_use_in_one_line(tmp_path):
    import commentaries
    from commentaries.common import DIGITS
    from commentaries.loop import Context

    weighting = storage.save_teacher(tmp_path / "auxilearn.pt", method="AuxiLearn", tensors={"raw": torch.ones(3)},
                                     dataset=DIGITS)
    unknown = storage.save_teacher(tmp_path / "unknown.pt", method="Removed", tensors={}, dataset=DIGITS)
    for path, message in ((weighting, "a AuxiLearn teacher cannot train a fresh student"),
                          (unknown, "learned by 'Removed', not a registered teaching method")):
        with pytest.raises(UserError, match=message):
            commentaries.run({"class": "TrainWithCommentary", "commentary": str(path)}, Context(run_dir=tmp_path))


def test_a_checkpoint_of_another_configuration_is_a_user_error(tmp_path):
    from commentaries.loop import CHECKPOINT_FORMAT

    checkpoints.write(tmp_path / "checkpoint.pt",
                      {"format": CHECKPOINT_FORMAT, "method": {"other": torch.zeros(())}, "step": 3,
                       "wall_time_s": 0.0, "random": train.random_states(),
                       "interval": {"sums": {}, "counts": {}}})
    with pytest.raises(UserError, match="not a checkpoint of this teaching configuration"):
        train.main(toy(), run_dir=tmp_path, progress=False)
