"""Signals in the workflow scripts: a process forked by a library inside ``exit_on_sigterm`` ends on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Forks (as multiprocessing.Pool's fork context does) from the main thread or from a worker thread (as a dask
# shard's case does), and reports the child's SIGTERM handler and mask, the parent's afterwards, and how the
# child ended when SIGTERM reached it while it waited on a semaphore its parent holds (an idle pool worker).
SCRIPT = """
import concurrent.futures, json, multiprocessing, os, signal, sys, time
from maisi.core.logs import exit_on_sigterm

def blocked():
    return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])

def fork_and_terminate():
    lock = multiprocessing.get_context("fork").Lock()
    lock.acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps([signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, blocked()]).encode() + b"\\n")
        lock.acquire()
        os._exit(0)
    child_default, child_blocked = json.loads(os.read(r, 100))
    os.kill(pid, signal.SIGTERM)
    deadline, status = time.monotonic() + 30, None
    while time.monotonic() < deadline and status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
        time.sleep(0.05)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"child_default": child_default, "child_blocked": child_blocked, "parent_blocked": blocked(),
            "killed_by": os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None,
            "exit_code": os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None}

with exit_on_sigterm():
    if sys.argv[1] == "thread":
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            out = ex.submit(fork_and_terminate).result()
    else:
        out = fork_and_terminate()
    out["handler_kept"] = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
print(json.dumps(out))
"""


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_child_forked_inside_the_handler_dies_on_sigterm(where):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, where], capture_output=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # The child has Python's default back and nothing blocked; SIGTERM ends it as the default does (no
    # SystemExit raised in a library's worker, which a terminating Pool could wait on for good).
    assert out["child_default"] and not out["child_blocked"], out
    assert out["killed_by"] == 15 and out["exit_code"] is None, out
    # The parent keeps its handler, and the forking thread its mask.
    assert out["handler_kept"] and not out["parent_blocked"], out
