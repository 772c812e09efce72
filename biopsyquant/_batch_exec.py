"""Where batch tasks run: this process, local worker processes, or dask.distributed.

All three runners expose the same small interface (``submit``, ``wait``, ``close``) over
future objects with ``result()``, ``done()`` and ``cancel()``, so the batch driver is the same
for a laptop and a cluster. Keep imports here light: worker processes import this module
before anything heavy, to pin their thread counts first.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

from .errors import InputError


def _worker_init() -> None:
    """Worker process set-up: one compute thread each, Ctrl-C handled by the parent only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    # import the engine now (threads pinned above): a worker started while another one
    # prepares a slide is then ready when the slide's tiles arrive
    import importlib

    for mod in ("biopsyquant.wsi", "biopsyquant.score", "biopsyquant.slide",
                "biopsyquant.tissue", "biopsyquant.fibers", "biopsyquant.compartments",
                "biopsyquant.cells", "biopsyquant.mhc", "biopsyquant.pixels"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - a task importing it reports the problem
            pass


def _noop() -> None:
    """Task that only makes the pool start a worker process."""


_LIBC: Any = None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    A worker that has just measured a tile has freed its large arrays, but glibc keeps much
    of that memory mapped (arrays below its dynamic mmap threshold land in the heap). Left
    alone, an idle worker keeps the resident size of its largest tile while the other
    worker and the driver peak, which adds up on a small machine.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class _LazyFuture:
    """Future of :class:`SerialRunner`: computed in this process when waited on."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        self._call = (fn, args, kwargs)
        self._state = "pending"
        self._value: Any = None

    def _run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self._value = fn(*args, **kwargs)
            self._state = "finished"
        except Exception as exc:  # noqa: BLE001 - delivered through result()
            self._value = exc
            self._state = "error"
        self._call = (None, (), {})

    def done(self) -> bool:
        return self._state != "pending"

    def cancel(self) -> bool:
        if self._state == "pending":
            self._state = "cancelled"
            self._call = (None, (), {})
        return True

    def result(self) -> Any:
        if self._state == "pending":
            self._run()
        if self._state == "error":
            raise self._value
        if self._state == "cancelled":
            raise RuntimeError("task was cancelled")
        return self._value


class SerialRunner:
    """Run tasks one at a time in this process (``--workers 1``)."""

    description = "serial (this process)"
    n_workers = 1

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> _LazyFuture:
        return _LazyFuture(fn, args, kwargs)

    def wait(self, futures: Iterable) -> tuple[set, set]:
        futures = list(futures)
        done = {f for f in futures if f.done()}
        if not done:
            for f in futures:
                if f._state == "pending":
                    f._run()
                    done = {f}
                    break
        return done, set(futures) - done

    def close(self, *, cancel: bool = False) -> None:
        return None


class ProcessRunner:
    """Run tasks in ``n`` local worker processes (``--workers N``)."""

    def __init__(self, n: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self.n_workers = int(n)
        self._pool = ProcessPoolExecutor(max_workers=int(n), mp_context=mp.get_context(method),
                                         initializer=_worker_init)
        # the pool starts processes on demand; start them all now so that their start-up
        # (imports) overlaps the first slide's preparation instead of following it
        for _ in range(int(n)):
            self._pool.submit(_noop)
        self.description = f"{n} local worker processes ({method})"

    def submit(self, fn: Callable, *args: Any, **kwargs: Any):
        return self._pool.submit(fn, *args, **kwargs)

    def wait(self, futures: Iterable) -> tuple[set, set]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, not_done = wait(list(futures), return_when=FIRST_COMPLETED)
        return set(done), set(not_done)

    def close(self, *, cancel: bool = False) -> None:
        if cancel:
            procs = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:  # our own workers: stop tasks still running
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)
        else:
            self._pool.shutdown(wait=True)


class DaskRunner:
    """Run tasks on dask.distributed: a scheduler ``address`` or a new ``LocalCluster``."""

    def __init__(self, address: str | None, n_workers: int = 2) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:  # pragma: no cover - dask[distributed] is a dependency
            raise InputError("--scheduler needs dask.distributed: pip install "
                             "'dask[distributed]'") from None
        self._cluster = None
        if address in (None, "", "local"):
            self._cluster = LocalCluster(n_workers=max(1, int(n_workers)), threads_per_worker=1,
                                         processes=True, dashboard_address=None,
                                         host="127.0.0.1")
            self._client = Client(self._cluster)
            self.description = f"dask LocalCluster ({n_workers} worker processes)"
        else:
            try:
                self._client = Client(address, timeout="10s")
            except OSError as exc:
                raise InputError(f"cannot reach the dask scheduler at {address}: {exc}; start "
                                 "it with 'dask scheduler' (see docs/cluster.md)") from None
            self.description = f"dask scheduler {address}"
        info = self._client.scheduler_info()
        self.n_workers = max(1, len(info.get("workers", {})))

    def submit(self, fn: Callable, *args: Any, **kwargs: Any):
        return self._client.submit(fn, *args, pure=False, **kwargs)

    def wait(self, futures: Iterable) -> tuple[set, set]:
        from distributed import wait

        res = wait(list(futures), return_when="FIRST_COMPLETED")
        return set(res.done), set(res.not_done)

    def close(self, *, cancel: bool = False) -> None:
        try:
            self._client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()


def make_runner(workers: int = 1, scheduler: str | None = None):
    """Runner for ``--workers N`` / ``--scheduler ADDRESS|local``."""
    if workers is None or int(workers) < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if scheduler is not None:
        return DaskRunner(scheduler, n_workers=int(workers))
    if int(workers) == 1:
        return SerialRunner()
    return ProcessRunner(int(workers))
