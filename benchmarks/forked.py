"""One fuzz case in a forked child, with an address-space and a time limit (fuzz_readers.py, fuzz_options.py).

The parent must not have run torch's thread pools before it forks: a child that uses them then can hang.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
import traceback
from pathlib import Path
from typing import Callable


def exception_result(exc: BaseException) -> dict:
    """An exception as a case's outcome, with the line of coral_core's code (else the last line) it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "coral_core" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return {"outcome": "exception", "message": f"{type(exc).__name__}: {str(exc)[:200]}", "where": where}


def run_forked(work: Callable[[], dict], report: Path, timeout: float, memory_gib: float,
               prepare: Callable[[], None] | None = None, timed_out: str = "timed out") -> dict:
    """``work()`` in a forked child whose address space may grow by ``memory_gib`` and which is killed after
    ``timeout`` seconds; its dict, or: ``{"outcome": "out of memory"}`` for a MemoryError, an exception's
    (:func:`exception_result`), ``timed_out`` at the time limit, ``"killed"`` for a signal or an exit without a
    report. ``prepare()`` runs first in the child (its output streams, its folder). ``report``: where the child
    leaves its dict."""
    pid = os.fork()
    if pid == 0:  # the child: limits, work, report, leave without cleanup
        code = 0
        try:
            if prepare is not None:
                prepare()
            used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
            limit = used + int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            try:
                result = work()
            except MemoryError:
                result = {"outcome": "out of memory"}
            except BaseException as exc:  # noqa: BLE001 - the defect being counted
                result = exception_result(exc)
            report.write_text(json.dumps(result))
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"outcome": timed_out}
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        return {"outcome": "killed", "message": signal.Signals(os.WTERMSIG(status)).name}
    if not report.exists():
        return {"outcome": "killed", "message": f"exit status {os.WEXITSTATUS(status)}"}
    return json.loads(report.read_text())
