"""The training loop around the pure step (:mod:`step`): samplers, state,
counters, compilation, checkpoints.

One *hyperparameter step* is ``network_weight_steps`` weight updates followed
by one update of the hyperparameters from a hypergradient; :class:`Trainer`
draws each update's rows from its samplers and calls the pure
:meth:`step.Program.step` on its state. Data sits on the device as tensors
and batches are gathered by index inside the step; nothing in the loop
waits for the host.

All state needed to continue a run bit for bit (the step's state, samplers,
counters) is in :meth:`Trainer.state_dict`, as tensors, dicts, lists,
tuples, numbers and strings only (``torch.load(..., weights_only=True)``).
"""
import contextlib
import ctypes
import functools
import logging
import os
import time

import torch

import hyperparameters as hp
import hypergradients
from errors import UserError
from hyperparameters import TRANSFORMS
from optimisers import HYPERPARAMETER_OPTIMISERS, OPTIMISERS
from registry import closest
from step import Program
from trees import tree_map


def whole_split(batch_size, size):
    """Whether a batch covers the whole split (``batch_size: full``, or at
    least as many rows as the split has)."""
    return batch_size == "full" or batch_size >= size


class Sampler:
    """Endless minibatches of indices: a fresh permutation every epoch, the
    incomplete last batch dropped. ``None`` means "the whole split" (batch
    ``full`` or at least as large as the split), which avoids a gather per step."""

    def __init__(self, size, batch_size, seed, device):
        self.size, self.batch_size, self.device = size, batch_size, device
        self.whole = whole_split(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = None, 0

    def next(self):
        if self.whole:
            return None
        if self.order is None or self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator).to(self.device)
            self.position = 0
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


class Problem:
    """Model + loss + data."""

    def __init__(self, model, loss_function, data):
        self.model, self.loss_function, self.data = model, loss_function, data

    def initial_weights(self):
        return tuple(p.detach().clone() for p in self.model.parameters())

    def initial_buffers(self):
        return {name: b.detach().clone() for name, b in self.model.named_buffers()}

    def split(self, name):
        return getattr(self.data, f"{name}_inputs"), getattr(self.data, f"{name}_targets")


def build_weight_optimiser(spec, where):
    """``network_weight: {class: SGD, lr: .., momentum: .., lr_multiplier: ..}``
    -> (optimiser, initial raw hyperparameters, lr multiplier or None)."""
    optimiser = OPTIMISERS.get(spec.get("class"), f"{where}.class")()
    values = {key: value for key, value in spec.items() if key not in ("class", "lr_multiplier")}
    for key in values:
        if key not in optimiser.hyperparameters:
            valid = ", ".join(f"{k}={v}" for k, v in optimiser.hyperparameters.items())
            raise UserError(f"{where}: unknown hyperparameter '{key}' for {spec['class']}; "
                            f"valid (with natural defaults): {valid}, lr_multiplier")
    multiplier = spec.get("lr_multiplier")
    if multiplier is not None and (isinstance(multiplier, bool)
                                   or not isinstance(multiplier, (int, float)) or multiplier <= 0):
        raise UserError(f"{where}.lr_multiplier: must be a positive number, got {multiplier!r}")
    return optimiser, values, multiplier


def default_raw(optimiser, transforms):
    """Raw values for hyperparameters the config leaves out: the optimiser's
    natural defaults mapped into each transform's space (a natural 0 under
    ``10^``/``exp``/``sigmoid`` becomes -30, i.e. 1e-30 or 1e-13)."""
    raw = {}
    for name, natural in optimiser.hyperparameters.items():
        inverse = TRANSFORMS[transforms.get(name)][1]
        try:
            raw[name] = inverse(natural)
        except (ValueError, ZeroDivisionError):
            raw[name] = -30.0
    return raw


def build_program(config, problem, device, dtype):
    """The :class:`step.Program` of a configuration, its initial raw
    hyperparameters ``{name: number}`` and the weight optimiser."""
    optimiser, configured, lr_multiplier = build_weight_optimiser(
        config["network_weight"], config.where("network_weight"))
    for list_key in ("optimised_hyperparameters", "high_dimensional_hyperparameters",
                     "transformed_hyperparameters", "hyperparameter_clipping"):
        for name in config[list_key]:
            if name not in optimiser.hyperparameters:
                raise UserError(
                    f"{config.where(list_key)}: '{name}' is not a hyperparameter of "
                    f"{config['network_weight']['class']}"
                    f"{closest(name, optimiser.hyperparameters)}; valid: "
                    f"{', '.join(optimiser.hyperparameters)}")
    if lr_multiplier is not None and "lr" not in optimiser.hyperparameters:
        raise UserError(f"{config.where('network_weight.lr_multiplier')}: "
                        f"{config['network_weight']['class']} has no lr")
    initial = default_raw(optimiser, config["transformed_hyperparameters"])
    initial.update(configured)
    method = hypergradients.METHODS.build(config["hypergradient"], config.where("hypergradient"))
    optimised = [name for name in initial if name in config["optimised_hyperparameters"]]
    refusal = getattr(method, "check_optimised", lambda names: None)(optimised)
    if refusal:
        raise UserError(f"{config.where('hypergradient')}: {refusal}")
    if optimised and isinstance(method, hypergradients.NoHypergradient):
        raise UserError(f"{config.where('optimised_hyperparameters')}: hyperparameters are "
                        f"optimised but hypergradient.class is None")
    outer = (HYPERPARAMETER_OPTIMISERS.build(config["hyperparameter"],
                                             config.where("hyperparameter"))
             if optimised else None)
    validation = "validation" if len(problem.data.validation_inputs) else "training"
    program = Program(
        model=problem.model, loss_function=problem.loss_function, data=problem.data,
        optimiser=optimiser, method=method, outer=outer,
        transforms=config["transformed_hyperparameters"],
        clipping=config["hyperparameter_clipping"], optimised=optimised,
        network_weight_steps=config["network_weight_steps"], lr_multiplier=lr_multiplier,
        reset=config["reset_model_after_hyperparameter_update"], validation_split=validation)
    return program, initial


def initial_state(program, config, weights, buffers, initial, device, dtype):
    raw = hp.initial_raw(initial, high_dimensional=config["high_dimensional_hyperparameters"],
                         weight_shapes=[w.shape for w in weights], device=device, dtype=dtype,
                         where=config.where("network_weight"))
    return program.initial_state(weights, raw, buffers)


def compiler(device, where="compile"):
    """``torch.compile`` as ``compile: true`` applies it to the step's pieces,
    for a new program: what dynamo compiled for earlier programs in this
    process is dropped first. A fan-out worker trains population after
    population (or run after run); each new program's pieces are new guard
    variants of the same code objects, and past ``recompile_limit`` (8)
    dynamo would silently run the later ones eagerly (measured: the last two
    algorithms of a 7-algorithm campaign). Inductor's on-disk cache stays."""
    torch._dynamo.reset()
    # inductor looks for a CUDA toolkit even on CPU and warns when it finds none
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # cpp_wrapper: kernels called from generated C++ rather than Python, which
    # matters at these sizes; measured on CPU only.
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    return functools.partial(torch.compile, dynamic=False, options=options)


def keep_freed_memory():
    """Have the C library's ``malloc`` keep freed memory for reuse (glibc:
    no ``mmap`` for large blocks, the heap trimmed only past 256 MiB free),
    for the rest of the process. A population's tensors on the CPU are
    megabytes each (64 Fashion-MNIST-shape members: 10 MB per weight tensor),
    and every operation of the step makes new ones; with glibc's defaults each
    comes as fresh pages from the kernel, and the page faults cost as much as
    the arithmetic (a 64-member weight step: 28 against 18 ms of CPU; 256
    members: 136 against 73). Returns whether the settings took (False where
    the C library has no ``mallopt``: nothing changes)."""
    m_trim_threshold, m_mmap_max = -1, -4
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 256 << 20))


def flushing_denormals():
    """Whether this thread's CPU arithmetic flushes subnormal floats to zero
    (torch has a setter, :func:`torch.set_flush_denormal`, and no getter):
    a float32 subnormal times one is zero only when it does."""
    subnormal = torch.tensor(torch.finfo(torch.float32).tiny / 4, dtype=torch.float32)
    return (subnormal * 1.0).item() == 0.0


# OpenMP runtimes that torch's intra-op pool may run on, by soname; only one
# already loaded is used (``RTLD_NOLOAD``): libgomp on Linux, LLVM's libomp
# and Intel's libiomp5 (both also export ``GOMP_parallel``) elsewhere.
OPENMP_RUNTIMES = ("libgomp.so.1", "libomp.so", "libomp.dylib", "libiomp5.so")
_EACH_THREAD = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _openmp_runtime():
    """The OpenMP runtime loaded in this process, or None (another
    parallel backend, or a platform without ``RTLD_NOLOAD``)."""
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in OPENMP_RUNTIMES:
        try:
            runtime = ctypes.CDLL(name, mode=mode | os.RTLD_LAZY)
            runtime.GOMP_parallel.argtypes = (_EACH_THREAD, ctypes.c_void_p, ctypes.c_uint,
                                              ctypes.c_uint)
            runtime.GOMP_parallel.restype = None
            return runtime
        except (OSError, AttributeError):
            continue
    return None


def set_flush_denormal_on_every_thread(enabled):
    """``torch.set_flush_denormal`` for the calling thread *and* every
    thread of its intra-op pool. The flag lives in each thread's floating-point
    control register (x86 MXCSR), and torch sets the caller's only: the
    pool's threads keep theirs, and every parallel operation then waits for
    the slowest (``bench/denormal_threads.py``, 2 threads: a product over 4M
    subnormals took 12.7 ms with the caller's flag alone, 13.3 unflushed and
    0.65 with every thread's; a 64-member population, 734 s against 98 s
    with this). A thread created later
    inherits its creator's register. So one parallel region of the pool's
    size runs the setter in each thread; ``GOMP_parallel`` is the OpenMP
    runtime's entry point for a ``#pragma omp parallel`` region, and the
    region started from this thread uses the same pool as torch's. Returns
    the calling thread's ``torch.set_flush_denormal`` (False where the CPU
    has no such mode)."""
    supported = torch.set_flush_denormal(enabled)
    threads = torch.get_num_threads()
    runtime = _openmp_runtime() if threads > 1 else None
    if runtime is not None:
        # ctypes releases the GIL for the call; each thread's callback takes it back
        runtime.GOMP_parallel(_EACH_THREAD(lambda _: torch.set_flush_denormal(enabled)), None,
                              threads, 0)
    return supported


@contextlib.contextmanager
def denormals_flushed(enabled=True):
    """Subnormal floats (below 1.2e-38 in float32, 2.2e-308 in float64) read
    and written as zero by the CPU in the body (``flush_denormal``), on every
    intra-op thread, the calling thread's setting restored on all of them
    after it. Weights that weight decay or a tiny learning rate drive
    towards zero pass through subnormals, which x86 computes ten to a
    hundred times slower: 64 Ours_LR_Momentum members of the
    Fashion-MNIST shape ran 8x slower steps and 40x slower evaluations
    after 200 hyperparameter steps, with a third of the members' weights
    subnormal, and a single run slows the same way (bench/RESULTS.md). A
    subnormal weight is zero for the loss to float precision."""
    before = flushing_denormals()
    set_flush_denormal_on_every_thread(enabled)
    try:
        yield
    finally:
        set_flush_denormal_on_every_thread(before)


def compile_refusal(problem, config):
    """Why ``compile: true`` cannot take this configuration, or None."""
    buffers = [name for name, _ in problem.model.named_buffers()]
    if buffers:
        return (f"{config.where('compile')}: true is not supported for models with buffers "
                f"({', '.join(buffers)}); use compile: false")
    return None


class Sampled:
    """A run's three samplers (training, validation, logged validation),
    seeded ``seed + 1``, ``+ 2``, ``+ 3``."""

    def __init__(self, problem, batch_size, seed, device, validation_split):
        validation_size = len(problem.split(validation_split)[0])
        self.training = Sampler(len(problem.data.training_inputs), batch_size, seed + 1, device)
        self.validation = Sampler(validation_size, batch_size, seed + 2, device)
        # Minibatches for logged validation losses, apart from the hypergradient's.
        self.log = Sampler(validation_size, batch_size, seed + 3, device)

    def all(self):
        return (self.training, self.validation, self.log)

    def batches(self, program, network_weight_steps):
        """One step's indices: one per weight update, and the validation
        batch only when the step differentiates (so the sampler's stream
        is the same whatever the method)."""
        return {"training": [self.training.next() for _ in range(network_weight_steps)],
                "validation": self.validation.next() if program.recorded else None}

    def state_dict(self):
        return [sampler.state_dict() for sampler in self.all()]

    def load_state_dict(self, states):
        for sampler, state in zip(self.all(), states):
            sampler.load_state_dict(state)


class Trainer:
    """A run's state and the loop that advances it by pure steps."""

    def __init__(self, config, problem, device, dtype):
        self.config, self.problem = config, problem
        self.network_weight_steps = config["network_weight_steps"]
        self.program, initial = build_program(config, problem, device, dtype)
        self.optimiser, self.method = self.program.optimiser, self.program.method
        self.state = initial_state(self.program, config, problem.initial_weights(),
                                   problem.initial_buffers(), initial, device, dtype)
        self.compiled = False
        self.step_program = self.program
        if config["compile"]:
            refusal = compile_refusal(problem, config)
            if refusal:
                raise UserError(refusal)
            self.step_program = self.program.wrapped(compiler(device))
            self.compiled = True
        self.samplers = Sampled(problem, config["batch_size"], config["seed"], device,
                                self.validation_split)
        self.last_hypergradients = {}

    @property
    def validation_split(self):
        """Validation data, or the training data when the split is empty
        (``validation_proportion: 0``, as in Baydin et al.'s setting)."""
        return self.program.validation_split

    @property
    def weights(self):
        return self.state["weights"]

    @property
    def last_training_loss(self):
        return self.state["last_training_loss"]

    # The counters live in the state (the pure step advances them); reading one
    # waits for the device, so the loop reads them at intervals, not per step.
    hyperparameter_step = property(lambda self: int(self.state["hyperparameter_step"]))
    weight_step = property(lambda self: int(self.state["weight_step"]))

    def raw_hyperparameters(self):
        return self.state["hyperparameters"]

    def step(self):
        """One hyperparameter step."""
        batches = self.samplers.batches(self.program, self.network_weight_steps)
        self.state, metrics = self.step_program.step(self.state, batches)
        self.last_hypergradients = metrics["hypergradients"]

    def warm_up(self):
        """Compile (``compile: true``) before the timed loop: one step on
        batches of the right shapes, its result dropped (the step is pure,
        so the run's state and samplers are untouched). Returns the seconds."""
        if not self.compiled:
            return 0.0
        return compile_by_calling(self.step_program, self.state, shaped_batches(
            self.samplers, self.program, self.network_weight_steps, self.weights[0].device))

    def summary(self):
        """Natural value per hyperparameter (the mean for per-weight ones)."""
        return hp.summary(self.state["hyperparameters"], self.program.transforms)

    def evaluate(self, split, indices=None):
        return self.program.evaluate(self.weights, self.state["buffers"], split,
                                     self.config["evaluation_batch_size"], indices)

    def state_dict(self):
        return {"state": self.state, "samplers": self.samplers.state_dict()}

    def load_state_dict(self, saved):
        saved = counters_into_state(saved)
        expected = tree_map(lambda leaf: tuple(leaf.shape), self.state)
        found = tree_map(lambda leaf: tuple(leaf.shape), saved["state"])
        if expected != found:
            raise ValueError("the saved state does not match this configuration")
        self.state = saved["state"]
        self.samplers.load_state_dict(saved["samplers"])


def counters_into_state(saved):
    """A checkpoint written before the counters moved into the state (they
    were ints beside it) as one written after: it resumes unchanged."""
    if "hyperparameter_step" in saved["state"]:
        return saved
    device = saved["state"]["last_training_loss"].device
    counters = {key: torch.tensor(saved[key], dtype=torch.int64, device=device)
                for key in ("hyperparameter_step", "weight_step")}
    return {**saved, "state": {**saved["state"], **counters}}


def shaped_batches(samplers, program, network_weight_steps, device, members=None):
    """Batches of the shapes the run's samplers draw (rows ``0..B-1``), for
    compiling; ``members``: stacked for a population of that many."""
    def shaped(sampler):
        if sampler.whole:
            return None
        indices = torch.arange(sampler.batch_size, device=device)
        return indices if members is None else indices.expand(members, -1).contiguous()
    return {"training": [shaped(samplers.training)] * network_weight_steps,
            "validation": shaped(samplers.validation) if program.recorded else None}


def compile_by_calling(program, state, batches):
    """Compile ``program``'s step by calling it once (its result dropped: the
    step is pure); a compiler failure is one line. Returns the seconds."""
    started = time.perf_counter()
    with compiler_failures():
        program.step(state, batches)
    return time.perf_counter() - started


@contextlib.contextmanager
def compiler_failures():
    """A ``torch.compile`` failure inside as one line naming ``compile``."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as error:
        cause = getattr(error, "inner_exception", None) or error
        first_line = (str(cause).splitlines() or [""])[0][:200]
        raise UserError(f"compile: torch.compile failed ({type(cause).__name__}: "
                        f"{first_line}); use compile: false") from None
