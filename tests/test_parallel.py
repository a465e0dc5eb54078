"""Sharing a range with helper processes: same bytes as one core, and nothing depends on the helpers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import warm
from weightless_cli.codecs import parallel


def slow_formula(multiplier: int, delay_s: float, parent_pid: int, helper_exit: int | None):
    """A job for the helpers: ``(position * multiplier) % 251``, taking ``delay_s`` per call.

    With ``helper_exit`` set, a helper process (any pid but ``parent_pid``) dies on its first block.
    """

    def fill(start: int, stop: int, out: np.ndarray) -> None:
        if helper_exit is not None and os.getpid() != parent_pid:
            os._exit(helper_exit)
        time.sleep(delay_s)
        np.remainder(np.arange(start, stop, dtype=np.int64) * multiplier, 251, out=out, casting="unsafe")

    return fill


def expected(count: int, multiplier: int, dtype) -> np.ndarray:
    return (np.arange(count, dtype=np.int64) * multiplier % 251).astype(dtype)


@pytest.mark.parametrize("workers,dtype", [(2, np.uint8), (3, np.float32), (2, np.uint16)])
def test_shared_range_gives_the_same_bytes_as_one_core(pool, helper_blocks, workers, dtype):
    warm(pool, workers - 1)
    count = 60_000
    job = parallel.RangeJob(slow_formula, (7, 0.001, os.getpid(), None), np.dtype(dtype))
    out = np.empty(count, dtype=dtype)
    parallel.run_range(count, job, out, workers=workers)
    assert np.array_equal(out, expected(count, 7, dtype))
    assert helper_blocks and sum(helper_blocks) < count  # both sides did some of it
    one_core = np.empty(count, dtype=dtype)
    parallel.run_range(count, job, one_core, workers=1)
    assert one_core.tobytes() == out.tobytes()


def test_helpers_started_by_a_run_join_it_when_ready(pool, helper_blocks):
    # ~3 s on this thread alone, so a cold helper (~0.2 s to start; more on a loaded machine)
    # joins in time; it then takes 4,096-position blocks to this thread's 500, and the run ends early.
    count = 400_000
    job = parallel.RangeJob(slow_formula, (3, 0.004, os.getpid(), None), np.dtype(np.uint8))
    out = np.empty(count, dtype=np.uint8)
    parallel.run_range(count, job, out, workers=2)
    assert np.array_equal(out, expected(count, 3, np.uint8))
    assert helper_blocks


def test_a_helper_that_dies_leaves_its_blocks_to_this_thread(pool):
    helpers = warm(pool, 1)
    count = 20_000
    job = parallel.RangeJob(slow_formula, (5, 0.0005, os.getpid(), 9), np.dtype(np.int32))
    out = np.empty(count, dtype=np.int32)
    parallel.run_range(count, job, out, workers=2)
    assert np.array_equal(out, expected(count, 5, np.int32))
    assert not helpers[0].alive and helpers[0].process.returncode == 9
    replacement = warm(pool, 1)  # the next run starts a fresh helper
    assert replacement[0] is not helpers[0] and replacement[0].alive


def test_no_helper_starts_for_a_short_range(pool, monkeypatch):
    def refuse():
        raise AssertionError("a helper was started")

    monkeypatch.setattr(parallel, "_Helper", refuse)
    job = parallel.RangeJob(slow_formula, (2, 0.0, os.getpid(), None), np.dtype(np.uint8))
    out = np.empty(999, dtype=np.uint8)
    parallel.run_range(999, job, out, workers=4)  # under MIN_SHARED
    assert np.array_equal(out, expected(999, 2, np.uint8))


def test_a_helper_that_cannot_start_leaves_the_work_to_this_thread(pool, monkeypatch):
    monkeypatch.setattr(parallel.sys, "executable", "/nonexistent/python")
    job = parallel.RangeJob(slow_formula, (2, 0.0, os.getpid(), None), np.dtype(np.uint8))
    out = np.empty(5000, dtype=np.uint8)
    parallel.run_range(5000, job, out, workers=2)
    assert np.array_equal(out, expected(5000, 2, np.uint8))
    assert pool._helpers == []


def test_helpers_exit_when_the_pool_closes(pool):
    helpers = warm(pool, 2)
    pool.close()
    assert all(helper.process.returncode == 0 for helper in helpers)


def test_out_must_match_the_job():
    job = parallel.RangeJob(slow_formula, (2, 0.0, os.getpid(), None), np.dtype(np.uint8))
    with pytest.raises(ValueError, match="1-D uint8"):
        parallel.run_range(10, job, np.empty(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="at least 10"):
        parallel.run_range(10, job, np.empty(9, dtype=np.uint8))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_helpers_exit_when_their_parent_dies_without_cleaning_up():
    script = (
        "import os, select, sys\n"
        "from weightless_cli.codecs import parallel\n"
        "with parallel._POOL.borrow(2) as helpers:\n"
        "    for helper in helpers:\n"
        "        select.select([helper.reader], [], [], 30)\n"
        "    print(' '.join(str(helper.process.pid) for helper in helpers), flush=True)\n"
        "os._exit(0)  # no atexit: only the closed pipes tell the helpers\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    pids = [int(pid) for pid in child.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (the helpers' parent is gone, so init reaps them)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
