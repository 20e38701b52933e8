"""Suite-wide settings: small problems run faster on one thread, and a 2-core CI machine
shared with Lightning's worker threads thrashes with more."""

import contextlib
import os
import tempfile
from typing import Iterator

# NumPy's OpenBLAS on one thread, as torch's intra-op pool below: set before anything imports
# NumPy (torch does), and inherited by the tests' subprocesses.  Its idle threads spin and
# yield, which on a 2-core machine shared by three workers burns CPU the other workers need.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the suite runs its workers on Linux in CI)
    fcntl = None

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the CPUs this process may use (``--maxprocesses``
    caps it; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still overrides).  The subprocess and
    multi-process tests leave a core idle while their interpreters start and while they wait
    their turn for local ports; the extra worker fills it (on 2 cores the suite took 15 min
    with 3 workers, 18-19 min with 2)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) + 1
    return (os.cpu_count() or 1) + 1


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread, and whatever a test sets is undone."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def _port_lock() -> Iterator[None]:
    """Hold a lock shared by every pytest worker of this machine (``-n``): the tests marked
    ``ports`` run one at a time."""
    if fcntl is None:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "alignment_callback_tests_ports.lock"),
              "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(autouse=True, scope="module")
def _ports_module(request):
    """A module marked ``ports`` holds the lock throughout, its module fixtures included
    (they may start the processes)."""
    marked = any(mark.name == "ports" for mark in request.node.iter_markers())
    with _port_lock() if marked else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True)
def _ports_test(request):
    """A test marked ``ports`` in a module that is not holds the lock while it runs."""
    module = request.node.getparent(pytest.Module)
    in_marked_module = module is not None and any(
        mark.name == "ports" for mark in module.iter_markers())
    marked = request.node.get_closest_marker("ports") is not None and not in_marked_module
    with _port_lock() if marked else contextlib.nullcontext():
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a GPU is present and are deselected elsewhere."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("cuda") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]
