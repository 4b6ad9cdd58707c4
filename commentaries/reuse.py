"""Reuse a saved teacher (any method's file) to train a fresh student.

::

    teaching:
      class: TrainWithCommentary
      commentary: runs/.../teacher.pt
      student: {class: MLP, hidden: [128]}

The method named in the file (looked up in the registry, so this module knows
none of them) turns it into a :class:`common.FrozenTeaching`: example weights,
a blending grid, attention masks, a GTN's generated batches.
"""
import copy

from commentaries import TEACHERS, storage
from commentaries.common import (StudentTraining, build_student, check_choice, check_float, check_int,
                                 evaluation_generator)
from commentaries.loop import TeachingMethod
from errors import UserError


@TEACHERS.register("TrainWithCommentary")
class TrainWithCommentary(TeachingMethod):
    """Train a fresh student (any registered architecture) with a saved,
    frozen teacher; one outer step is one student step.

    ``data`` defaults to the dataset the teacher was learned on; a data file
    may set it, but it must name the same dataset class."""

    def __init__(self, *, context, commentary, student=None, data=None, steps=300, lr=0.001, batch_size=64,
                 optimiser="Adam", log_interval=25):
        self.payload = storage.load_teacher(commentary)
        learned_on = self.payload["dataset"] or {}
        if data is None:
            data = copy.deepcopy(learned_on)
        elif data.get("class") != learned_on.get("class"):
            raise UserError(f"teaching.data: the teacher in {commentary} was learned on "
                            f"{learned_on.get('class')}, not {data.get('class')}")
        self.steps, self.log_interval = check_int(steps, "steps", 1), check_int(log_interval, "log_interval", 1)
        self.lr = check_float(lr, "lr", 0.0, strict_minimum=True)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.optimiser = check_choice(optimiser, "optimiser", ("Adam", "SGD"))
        self.commentary, self.student_spec = commentary, student
        self.use_data(data, context)
        method = self.payload["method"]
        if method not in TEACHERS:
            raise UserError(f"teaching.commentary: {commentary} was learned by {method!r}, not a registered "
                            f"teaching method (valid: {', '.join(TEACHERS.names())})")
        self.teaching = TEACHERS.get(method).frozen_teaching(self.payload, self.data, context.device)
        if self.teaching is None:
            raise UserError(f"teaching.commentary: a {method} teacher cannot train a fresh student "
                            f"(it has no frozen_teaching)")

    def setup(self):
        generator = evaluation_generator(self.context.seed)
        model = build_student(self.student_spec, self.data, "teaching.student").to(self.context.device)
        self.student = StudentTraining(model, self.data, self.teaching, steps=self.steps, lr=self.lr,
                                       batch_size=self.batch_size, optimiser=self.optimiser, generator=generator)

    def checkpointed(self):
        return {"student": self.student}

    def outer_step(self, step):
        return {"Student/Loss/Batch": self.student.step(step)}

    def evaluate(self, step):
        return {f"Student/{tag}": value for tag, value in self.student.evaluate().items()}

    def finish(self, steps_done):
        final = {tag: float(value) for tag, value in self.student.evaluate().items()}
        return {"final": final, "teaching": {"teacher": {"path": str(self.commentary),
                                                         "method": self.payload["method"],
                                                         "learned_by": self.payload["learned_by"]}}}
