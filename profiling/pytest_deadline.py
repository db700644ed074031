"""A per-test time limit and a test log that survive a killed run, without a new dependency.

pytest-timeout is not on the GPU machine's image (and no package index is reachable there), so
profiling/device_check.sh loads this plugin instead when ``import pytest_timeout`` fails:

    TSPARSE_TEST_TIMEOUT=60 TSPARSE_TEST_LOG=tests.jsonl \\
        python -m pytest -p pytest_deadline ...        # with profiling/ on PYTHONPATH

* ``TSPARSE_TEST_TIMEOUT`` (seconds, 0 = off): SIGALRM fails the running test (setup, call or
  teardown) with "exceeded N s" and the run goes on - what pytest-timeout's signal method does.
  A test stuck inside C++ (a CUDA sync that never returns) cannot take the signal: a watchdog
  thread then records it as hung, dumps every thread's stack to stderr and ends the process
  (exit code 3) LIMIT + 30 s later, so the rest of the device check still runs.
* ``TSPARSE_TEST_LOG`` (a path): one JSON line per test phase outcome, written and flushed as it
  happens, so the results of a run that is interrupted or killed are not lost with its junit file.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import threading
import time

import pytest

# The process's real stderr, taken when pytest imports the plugin (before it starts capturing
# fd 2): the hang report must reach the log of the run, not a capture buffer that dies with it.
try:
    _STDERR_FD = os.dup(2)
except OSError:
    _STDERR_FD = 2
LIMIT = float(os.environ.get("TSPARSE_TEST_TIMEOUT", "0") or 0)
LOG = os.environ.get("TSPARSE_TEST_LOG") or None
GRACE = float(os.environ.get("TSPARSE_TEST_HANG_GRACE", "30"))


def _log(record: dict) -> None:
    if not LOG:
        return
    with open(LOG, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


class _Watchdog:
    def __init__(self) -> None:
        self.nodeid = None
        self.deadline = None
        self.lock = threading.Lock()
        t = threading.Thread(target=self._run, daemon=True, name="tsparse-test-watchdog")
        t.start()

    def arm(self, nodeid: str, seconds: float) -> None:
        with self.lock:
            self.nodeid, self.deadline = nodeid, time.monotonic() + seconds

    def disarm(self) -> None:
        with self.lock:
            self.nodeid, self.deadline = None, None

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                nodeid = self.nodeid
            if late:
                _log({"nodeid": nodeid, "when": "call", "outcome": "failed", "duration": None,
                      "message": f"hung: no return {LIMIT:.0f} + {GRACE:.0f} s after the start (process ended)"})
                os.write(_STDERR_FD, f"\npytest_deadline: {nodeid} hung; dumping stacks and exiting\n".encode())
                faulthandler.dump_traceback(file=_STDERR_FD, all_threads=True)
                os._exit(3)


_WATCHDOG = _Watchdog() if LIMIT > 0 else None


def _on_alarm(signum, frame):  # noqa: ARG001
    pytest.fail(f"exceeded the per-test limit of {LIMIT:.0f} s (TSPARSE_TEST_TIMEOUT)", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001
    if LIMIT <= 0:
        yield
        return
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    _WATCHDOG.arm(item.nodeid, LIMIT + GRACE)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _WATCHDOG.disarm()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        message = None
        if report.outcome != "passed" and report.longrepr is not None:
            text = str(report.longrepr)
            message = text.strip().splitlines()[-1][:300] if text.strip() else None
        _log({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": round(report.duration, 3), "message": message})
