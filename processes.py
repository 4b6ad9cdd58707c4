"""Nothing runs twice: run-directory locks, workers that die with their parent,
and preemption that checkpoints at the next hyperparameter step.

* :func:`run_directory_lock` holds ``fcntl.flock`` on ``<run_dir>/.lock`` for
  as long as a run trains there. The kernel drops it when the process dies,
  however it dies, so a stale lock never blocks a resume; a second process
  that wants the same directory waits for the first to finish (and then finds
  its results).
* :func:`die_with_parent` makes a worker process exit when the process that
  started it is gone (``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread on
  ``os.getppid()`` everywhere), so a killed ``parallel_exec.py`` or
  ``bayesopt.py`` takes its local workers with it.
* :data:`preemption` is how submitit's ``checkpoint()`` (called from the
  preemption/time-out signal handler) asks the training loop to write its
  current state at the next hyperparameter-step boundary, and waits for it.
"""
import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_directory_lock(run_dir, on_wait=None):
    """Hold the run directory's lock; yields True if another process held it first.

    ``on_wait`` is called once if the lock is busy, before blocking on it."""
    handle = open(Path(run_dir) / LOCK_FILE, "a+")
    waited = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield waited
    finally:
        handle.close()  # releases the lock


def die_with_parent(parent=None, poll_interval_s=1.0):
    """Exit this process as soon as its parent process (``parent``, default:
    the current one) is gone."""
    parent = parent or os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class Preemption:
    """A request from a signal handler to checkpoint at the next step boundary.

    The training loop runs in a thread of its own while the main thread waits
    for it (see :func:`run_in_thread`), so the handler can block until the
    state is on disk without deadlocking."""

    def __init__(self):
        self._requested = threading.Event()
        self._saved = threading.Event()

    def request_and_wait(self, timeout_s):
        """Ask for a checkpoint; True once it is written, False after ``timeout_s``."""
        self._requested.set()
        return self._saved.wait(timeout_s)

    def requested(self):
        return self._requested.is_set()

    def saved(self):
        self._saved.set()

    def reset(self):
        self._requested.clear()
        self._saved.clear()


class Preempted(Exception):
    """Raised in the training thread once its state is saved for a requeue."""


preemption = Preemption()


def run_in_thread(function, *args):
    """``function(*args)`` in a worker thread, the main thread waiting in short
    slices so that signal handlers (submitit's) run while it trains."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 -- re-raised in the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, name="training", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
