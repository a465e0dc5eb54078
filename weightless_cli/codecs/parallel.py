"""Fill one long array on this thread and on helper processes at once (pure numpy + stdlib).

A caller gives :func:`run_range` a :class:`RangeJob`: a module-level ``factory`` and its
picklable ``args``, where ``factory(*args)`` returns ``fill(start, stop, out)``, a function
that writes the results for positions ``start .. stop-1`` into the 1-D array ``out``. This
thread fills the range from the front. Each helper process builds the same ``fill`` from
the pickled job and fills blocks handed out from the back, into a small shared-memory ring;
this thread copies each finished block into place (a memcpy, ~0.2 ms per MiB).

Why processes rather than threads: numpy releases the GIL inside each call, but the
codec's calls are short, because 32k-element temporaries stay in L2. On such calls two
threads spent as much time handing the GIL over as they gained (measured on VGG-16 fc6's
decode: 1 thread 55 M positions/s, 2 threads 58 M/s). Longer calls spill the cache (2
threads at most 80 M/s). Two processes each run at full speed.

Helpers are started on first use and kept for the life of the process. They exit when their
pipe closes. Nothing depends on them: a helper that fails to start or dies hands its
unfinished blocks back to this thread, so the output bytes are the same either way.

The pipe protocol is private to this module. Frames to a helper are a 24-byte header
``<4sIQQ`` (kind, slot, a, b):

* ``JOB `` (a = payload length): a pickled ``(factory, args, dtype)`` follows;
* ``FILL`` (a = start, b = stop): fill those positions into ring slot ``slot``;
* ``DONE``: drop the job.

A helper answers each ``FILL``, once the slot holds the results, with ``<IQQ`` (slot,
start, stop). Its first bytes, once it has imported numpy, are :data:`READY`.
"""

from __future__ import annotations

import atexit
import mmap
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Fill = Callable[[int, int, np.ndarray], None]

MAX_WORKERS = 8
MIN_SHARED = 1 << 22  # positions: smaller ranges (< ~0.1 s) are not worth a helper's round trips
LOCAL_STEP = 1 << 17  # positions this thread fills between looks at the helpers
MIN_BLOCK = 1 << 17  # positions: a smaller block costs more in round trips than it saves
SLOT_BYTES = 1 << 20  # one block's results; two slots per helper, one per block it may hold
RING_SLOTS = 2
HELPER_TIMEOUT_S = 60.0  # a helper silent this long with work outstanding is given up

READY = b"WLHR"
_HEADER = struct.Struct("<4sIQQ")
_ANSWER = struct.Struct("<IQQ")
_BOOT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "sys.path[:0] = os.environ['WEIGHTLESS_HELPER_PATH'].split(os.pathsep); "
    "from weightless_cli.codecs.parallel import serve; serve({ring_fd}, {slot_bytes})"
)


@dataclass(frozen=True)
class RangeJob:
    """``factory(*args)`` gives the ``fill`` for one range; both must pickle (factory by name)."""

    factory: Callable[..., Fill]
    args: tuple
    dtype: np.dtype


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Cores used when none are given: :func:`usable_cpus`, at most :data:`MAX_WORKERS`."""
    return min(MAX_WORKERS, usable_cpus())


def run_range(count: int, job: RangeJob, out: np.ndarray, workers: int | None = None) -> None:
    """Fill ``out[0:count]`` with ``job``'s results, using up to ``workers`` cores (default: all usable).

    This thread is one of the workers; the others are helper processes, used only for
    ranges of at least :data:`MIN_SHARED` positions.
    """
    if out.ndim != 1 or out.size < count or out.dtype != job.dtype:
        raise ValueError(f"out must be a 1-D {job.dtype} array of at least {count} elements")
    fill = job.factory(*job.args)
    wanted = default_workers() if workers is None else max(1, workers)
    # Helpers need a Python to start (an embedding application may have none) and POSIX pipes for select().
    can_start = bool(sys.executable) and os.name == "posix"
    shareable = can_start and wanted > 1 and count >= MIN_SHARED and out.flags.c_contiguous
    if not shareable:
        fill(0, count, out[:count])
        return
    with _POOL.borrow(wanted - 1) as helpers:
        _SharedRun(count, job, fill, out, helpers).run()


# ----------------------------------------------------------------------------- this side


class _SharedRun:
    """One range shared between this thread (from the front) and helpers (blocks from the back)."""

    def __init__(self, count: int, job: RangeJob, fill: Fill, out: np.ndarray, helpers: list[_Helper]) -> None:
        self.fill, self.out = fill, out
        self.front, self.back = 0, count
        self.reclaimed: list[tuple[int, int]] = []  # blocks a lost helper left unfinished
        self.helpers = helpers
        self.job = job
        self._payload: bytes | None = None

    def run(self) -> None:
        try:
            while True:
                self._serve_helpers(wait=False)
                if self.reclaimed:
                    start, stop = self.reclaimed.pop()
                    self.fill(start, stop, self.out[start:stop])
                elif self.front < self.back:
                    stop = min(self.front + LOCAL_STEP, self.back)
                    self.fill(self.front, stop, self.out[self.front : stop])
                    self.front = stop
                elif any(helper.pending for helper in self.helpers):
                    self._serve_helpers(wait=True)
                else:
                    break
        finally:
            for helper in self.helpers:
                helper.finish_job()

    def _serve_helpers(self, wait: bool) -> None:
        """Take in every answer that is ready (waiting for one if ``wait``), then hand out blocks."""
        live = [helper for helper in self.helpers if helper.alive]
        listening = [helper for helper in live if helper.starting or helper.pending]
        if listening:
            timeout = HELPER_TIMEOUT_S if wait else 0.0
            readable, _, _ = select.select([helper.reader for helper in listening], [], [], timeout)
            if wait and not readable:
                for helper in listening:
                    self._lose(helper)
            for helper in listening:
                if helper.reader in readable and not self._take_answer(helper):
                    self._lose(helper)
        for helper in live:
            idle = helper.alive and not helper.starting and not helper.has_job
            if idle and self.front < self.back and not helper.send_job(self._job_payload()):
                self._lose(helper)
            while helper.alive and helper.has_job and len(helper.pending) < RING_SLOTS and self._hand_out(helper):
                pass

    def _take_answer(self, helper: _Helper) -> bool:
        return helper.accept_ready() if helper.starting else helper.receive_block(self.out)

    def _job_payload(self) -> bytes:
        if self._payload is None:  # pickled only once a helper is ready for it
            job = self.job
            self._payload = pickle.dumps((job.factory, job.args, np.dtype(job.dtype)), protocol=pickle.HIGHEST_PROTOCOL)
        return self._payload

    def _hand_out(self, helper: _Helper) -> bool:
        """Give ``helper`` the last block of the unclaimed range, sized so all finish together."""
        sharers = 1 + sum(1 for other in self.helpers if other.alive and other.has_job)
        block = min(helper.slot_bytes // self.out.itemsize, (self.back - self.front) // (2 * sharers))
        if block < MIN_BLOCK:
            return False
        start, stop = self.back - block, self.back
        if not helper.send_fill(start, stop):
            self._lose(helper)
            return False
        self.back = start
        return True

    def _lose(self, helper: _Helper) -> None:
        """Stop ``helper`` and take back the blocks it owes."""
        self.reclaimed.extend((start, stop) for _, start, stop in helper.pending)
        helper.kill()


# ----------------------------------------------------------------------------- the helpers


class _Helper:
    """One helper process, its ring of result slots, and this side's view of it."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        search_path = os.pathsep.join([package_root, *(entry for entry in sys.path if entry)])
        self.slot_bytes = SLOT_BYTES
        ring_fd = _shared_file(RING_SLOTS * self.slot_bytes)
        try:
            self.ring = mmap.mmap(ring_fd, RING_SLOTS * self.slot_bytes)
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT.format(ring_fd=ring_fd, slot_bytes=self.slot_bytes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "WEIGHTLESS_HELPER_PATH": search_path},
                pass_fds=(ring_fd,),
                bufsize=0,
            )
        finally:
            os.close(ring_fd)
        self.reader = self.process.stdout.fileno()
        self.writer = self.process.stdin.fileno()
        self.starting, self.has_job, self.alive = True, False, True
        self.pending: deque[tuple[int, int, int]] = deque()  # (slot, start, stop), oldest first

    def accept_ready(self) -> bool:
        ok = _read_exact(self.reader, len(READY)) == READY
        self.starting = False
        return ok

    def send_job(self, payload: bytes) -> bool:
        self.has_job = self._send(_HEADER.pack(b"JOB ", 0, len(payload), 0)) and self._send(payload)
        return self.has_job

    def send_fill(self, start: int, stop: int) -> bool:
        slot = min(set(range(RING_SLOTS)) - {busy for busy, _, _ in self.pending})
        if not self._send(_HEADER.pack(b"FILL", slot, start, stop)):
            return False
        self.pending.append((slot, start, stop))
        return True

    def receive_block(self, out: np.ndarray) -> bool:
        """Copy the oldest block's results into ``out``; False if the helper broke the protocol."""
        header = _read_exact(self.reader, _ANSWER.size)
        if len(header) != _ANSWER.size or _ANSWER.unpack(header) != self.pending[0]:
            return False
        slot, start, stop = self.pending.popleft()
        out[start:stop] = np.frombuffer(self.ring, dtype=out.dtype, count=stop - start, offset=slot * self.slot_bytes)
        return True

    def finish_job(self) -> None:
        """After a run: a helper with answers still owed is dropped (they would be read as the next run's)."""
        if self.pending:
            self.kill()
        elif self.has_job:
            self.has_job = False
            if not self._send(_HEADER.pack(b"DONE", 0, 0, 0)):
                self.kill()

    def _send(self, data: bytes) -> bool:
        try:
            _write_all(self.writer, data)
            return True
        except OSError:  # the helper is gone (EPIPE)
            return False

    def kill(self) -> None:
        self.alive = False
        self.pending.clear()
        if self.process.poll() is None:
            self.process.kill()
        self._reap()

    def close(self) -> None:
        """Let the helper see the end of its input and exit; kill it if it does not."""
        if not self.alive:
            return
        self.alive = False
        self.process.stdin.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._reap()

    def disown(self) -> None:
        """In a forked child: let go of the parent's pipes, so the helper still sees the parent's end."""
        self.alive = False
        self._close_pipes()

    def _reap(self) -> None:
        self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        self.process.stdin.close()
        self.process.stdout.close()


class _Pool:
    """The helpers of this process, lent to one run at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._helpers: list[_Helper] = []
        self._owner = os.getpid()

    @contextmanager
    def borrow(self, count: int) -> Iterator[list[_Helper]]:
        """Up to ``count`` helpers (none while another thread holds them, or if none will start)."""
        if not self._lock.acquire(blocking=False):
            yield []
            return
        try:
            if self._owner != os.getpid():  # a forked child: the helpers are the parent's
                for helper in self._helpers:
                    helper.disown()
                self._helpers, self._owner = [], os.getpid()
            for helper in self._helpers:
                if helper.alive and helper.process.poll() is not None:
                    helper.kill()  # died between runs
            self._helpers = [helper for helper in self._helpers if helper.alive]
            while len(self._helpers) < count:
                try:
                    self._helpers.append(_Helper())
                except OSError:
                    break
            yield self._helpers[:count]
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._owner == os.getpid():
            for helper in self._helpers:
                helper.close()
        self._helpers = []


_POOL = _Pool()
atexit.register(_POOL.close)


# ----------------------------------------------------------------------------- the helper side


def serve(ring_fd: int, slot_bytes: int) -> None:
    """A helper's main loop: answer frames on stdin until it closes (see the module docstring)."""
    ring = mmap.mmap(ring_fd, RING_SLOTS * slot_bytes)
    reader = sys.stdin.fileno()
    writer = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the answers
    _write_all(writer, READY)
    fill, dtype = None, np.dtype(np.uint8)
    while True:
        header = _read_exact(reader, _HEADER.size)
        if len(header) < _HEADER.size:
            return
        kind, slot, a, b = _HEADER.unpack(header)
        if kind == b"JOB ":
            factory, args, dtype = pickle.loads(_read_exact(reader, a))
            fill = factory(*args)
        elif kind == b"FILL" and fill is not None and slot < RING_SLOTS and 0 < b - a <= slot_bytes // dtype.itemsize:
            fill(a, b, np.frombuffer(ring, dtype=dtype, count=b - a, offset=slot * slot_bytes))
            _write_all(writer, _ANSWER.pack(slot, a, b))
        elif kind == b"DONE":
            fill = None
        else:
            return


# ----------------------------------------------------------------------------- pipes


def _shared_file(size: int) -> int:
    """A file descriptor of ``size`` zero bytes that two processes can map: memory where Linux
    allows (memfd), else an unlinked temporary file."""
    try:
        fd = os.memfd_create("weightless-ring")
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(prefix="weightless-ring-")
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def _read_exact(fd: int, size: int) -> bytes:
    """``size`` bytes, or fewer if the pipe ends first."""
    parts, left = [], size
    while left:
        part = os.read(fd, left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
