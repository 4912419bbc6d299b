"""Per-kernel locks that serialize executions across the threads *and* processes of a host.

A kernel runs one cell at a time, so requests for it queue anyway; queueing them here rather
than in the kernel means that a request whose deadline passes while it waits has not started,
and interrupting the kernel at a deadline can only ever stop the caller's own code.

Lock story: a queue per kernel id hands the kernel from thread to thread within a process, in
the order they asked; an `flock` on a file per kernel id (in a private directory) hands it
between gunicorn workers (in no set order). Both are waited for with the caller's deadline (see
`_FlockWaiter`). Where no private directory can be had, the lock is process-wide only, and a
warning says so. A kernel's lock file is removed when the kernel is gone (`forget`), or once no
process took it for a while (`sweep`); a caller that waited on a removed file takes the new one.

The same directory holds files that their process keeps an `flock` on for as long as it lives
(`create_held`; `take_if_abandoned` tells a dead process's): the reservations of kernel starts
counted against JUPYTER_MAX_KERNELS (`KernelLocks.reserve`), and the lists of pooled kernels
(`pool.PoolLedger`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.kernels.errors import KernelBusy, KernelNotFound

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a cancellable wait asks whether it was cancelled
FORGOTTEN = 4096  # how many forgotten (gone) kernel ids a process remembers at most
FORGOTTEN_SECONDS = 60.0  # and for how long
RESERVED = "start-"  # the prefix of the files of `KernelLocks.reserve`
START_LOCK = "kernel-starts"  # the lock under which a counted start counts and reserves
MAKING = ".making-"  # (hidden) the prefix of a file `create_held` is still making (`sweep`)
GONE = b"gone"  # what `forget` writes into a kernel's lock file before removing it
STALE_SECONDS = 3600.0  # a lock file no process has taken for this long is removed (`sweep`)
SWEEP_SECONDS = 600.0  # how often a process looks for such files


class KernelLocks:
    """The locks of the kernels of one Jupyter server (named by its URL)."""

    def __init__(self, server_url: str, max_waiting: int = 0, max_waiting_total: int = 0) -> None:
        """`max_waiting` callers may wait for a kernel in this process, and `max_waiting_total`
        for all kernels together (0: no limit)."""
        self.max_waiting = max_waiting
        self.max_waiting_total = max_waiting_total
        self._limited_total = 0  # callers counted against the limits, waiting for any kernel
        self._guard = threading.Lock()
        self._turns: dict[str, _Turns] = {}
        self._parked: dict[str, _FlockWaiter] = {}  # flock waits given up, to be taken over
        self._forgotten: OrderedDict[str, float] = OrderedDict()  # id: until when
        self._reserved: set[str] = set()  # `reserve` without a private directory
        self._descriptors: set[int] = set()  # of lock files, open now (see `forget_inherited`)
        self._server_url = server_url
        self._directory = private_directory(server_url)
        self._next_sweep = 0.0  # (monotonic) when `hold` next starts a `sweep`

    @contextmanager
    def hold(self, kernel_id: str, deadline: float,
             cancelled: Callable[[], bool] | None = None, *,
             limited: bool = True) -> Iterator[bool]:
        """Holds the kernel's lock (yields True), or yields False if `deadline` passes first
        (or `cancelled`, asked every half second while waiting, says True). The threads of a
        process get the kernel in the order they asked for it.

        Raises `KernelNotFound` if the kernel was forgotten (`forget`) while this waited, and
        `KernelBusy` at once if `max_waiting` callers already wait for this kernel;
        callers that are not `limited` (jobs, bounded by their own limit) are not counted.
        """
        if self._next_sweep <= time.monotonic():
            self._start_sweep()
        with self._guard:
            turns = self._turns.get(kernel_id)
            if turns is None:  # (not setdefault: no object made per call on the hot path)
                turns = self._turns[kernel_id] = _Turns()
            if not turns.held:
                turns.held, my_turn = True, None
            elif limited and self.max_waiting and turns.limited >= self.max_waiting:
                raise KernelBusy(f"{turns.limited} executions already wait for this kernel "
                                 f"(JUPYTER_MAX_QUEUED_EXECUTIONS is {self.max_waiting}); "
                                 "try again when it is less busy", kernel_id=kernel_id)
            elif limited and self.max_waiting_total \
                    and self._limited_total >= self.max_waiting_total:
                raise KernelBusy(f"{self._limited_total} executions already wait for busy "
                                 "kernels in this worker (all of its JUPYTER_PROXY_THREADS "
                                 "but two may); try again when this kernel is less busy",
                                 kernel_id=kernel_id)
            else:
                my_turn = _Turn(limited)
                self._line_up(turns, my_turn)
        if my_turn is not None and not self._wait_turn(kernel_id, turns, my_turn, deadline,
                                                       cancelled):
            yield False
            return
        try:
            if self._was_forgotten(kernel_id):
                raise KernelNotFound(kernel_id)
            with self._file_lock(kernel_id, deadline, cancelled) as acquired:
                yield acquired
        finally:
            self._pass_turn(kernel_id, turns)

    @contextmanager
    def reserve(self, name: str) -> Iterator[None]:
        """Counts `name` (a kernel being started) in `reserved()`, in every process of this
        host, until the block ends or this process dies."""
        if self._directory is None:
            with self._guard:
                self._reserved.add(name)
            try:
                yield
            finally:
                with self._guard:
                    self._reserved.discard(name)
            return
        fd = self._opened(self._in_directory(
            lambda directory: create_held(directory, f"{RESERVED}{name}")))
        try:
            yield
        finally:
            try:
                (self._directory / f"{RESERVED}{name}").unlink(missing_ok=True)
            finally:
                self._close(fd)

    def reserved(self) -> set[str]:
        """The names living processes of this host reserve now (`reserve`); those of a dead
        process are removed."""
        if self._directory is None:
            with self._guard:
                return set(self._reserved)
        names = set()
        for path in self._directory.glob(f"{RESERVED}*"):
            try:
                with take_if_abandoned(path) as fd:
                    if fd is None:
                        names.add(path.name.removeprefix(RESERVED))
                    else:
                        path.unlink()
            except FileNotFoundError:
                continue  # its start ended meanwhile
            except OSError:  # cannot tell (out of descriptors): counted, to be safe
                names.add(path.name.removeprefix(RESERVED))
        return names

    def forget_inherited(self) -> None:
        """In a forked child: closes the descriptors of lock files inherited from the parent.
        An `flock` belongs to the open file, so the child's copies would otherwise keep a lock
        the parent holds (a kernel's, or the one of counted starts) held after the parent lets
        go, for as long as the child lives. (No lock is taken: the child has one thread.)"""
        for fd in list(self._descriptors):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._descriptors.clear()

    def _opened(self, fd: int) -> int:
        with self._guard:
            self._descriptors.add(fd)
        return fd

    def _close(self, fd: int) -> None:
        with self._guard:
            self._descriptors.discard(fd)
        os.close(fd)

    @property
    def directory(self) -> Path | None:
        """The private directory of the lock files (None: the locks are per process)."""
        return self._directory

    def waiting(self, kernel_id: str) -> int:
        """How many callers of this process wait for the kernel (not counting its holder)."""
        with self._guard:
            turns = self._turns.get(kernel_id)
            return len(turns.waiting) if turns else 0

    def last_user(self, kernel_id: str) -> int | None:
        """The pid of the process that last held the kernel's lock (None if unknown)."""
        if self._directory is None:
            return None
        try:
            text = (self._directory / f"{kernel_id}.lock").read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.strip().isdigit() else None

    def forget(self, kernel_id: str) -> None:
        """For a kernel that is gone (shut down, or unknown): callers waiting for it, in any
        worker (its lock file says so, and is removed), and later ones in this process get
        `KernelNotFound` when their turn comes."""
        self._remember_forgotten(kernel_id)
        if self._directory is not None:
            path = self._directory / f"{kernel_id}.lock"
            with contextlib.suppress(OSError):  # (telling waiters is best effort)
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, GONE.ljust(15) + b"\n", 0)
                finally:
                    os.close(fd)
            path.unlink(missing_ok=True)

    def sweep(self, older_than: float | None = None) -> int:
        """Removes the lock files that no process has taken for `older_than` seconds (default
        `STALE_SECONDS`; kernels shut down by other clients of the server, or culled by it,
        leave theirs), and the hidden files of `create_held` left as long by a process killed
        while making one; returns how many. A caller that was about to take a lock file takes
        a new one instead (`_file_lock`)."""
        if self._directory is None:
            return 0
        cutoff = time.time() - (STALE_SECONDS if older_than is None else older_than)
        removed = 0
        failure: OSError | None = None
        for path in [*self._directory.glob("*.lock"), *self._directory.glob(f"{MAKING}*")]:
            try:
                if path.lstat().st_mtime >= cutoff:
                    continue
                # (Registered: a fork meanwhile must not keep the lock, see forget_inherited.)
                fd = self._opened(os.open(path, os.O_RDONLY | os.O_NOFOLLOW))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held, now = os.fstat(fd), path.lstat()
                    if held.st_mtime < cutoff and (held.st_dev, held.st_ino) == \
                            (now.st_dev, now.st_ino):
                        path.unlink()
                        removed += 1
                finally:
                    self._close(fd)
            except (BlockingIOError, FileNotFoundError):
                continue  # taken, or gone meanwhile
            except OSError as err:
                failure = failure or err  # the others are removed all the same
        if failure is not None:
            log.warning("could not remove a stale file of the kernel lock directory: %s", failure)
        return removed

    def _start_sweep(self) -> None:
        """Sweeps in a thread of its own, every `SWEEP_SECONDS` at most."""
        with self._guard:
            if self._next_sweep > time.monotonic():
                return  # another thread just started one
            if self._directory is None:
                self._next_sweep = float("inf")  # nothing to sweep, ever
                return
            self._next_sweep = time.monotonic() + SWEEP_SECONDS

        def sweep() -> None:
            try:
                removed = self.sweep()
            except OSError as err:
                log.warning("could not remove stale kernel lock files: %s", err)
                return
            if removed:
                log.info("removed %d stale files (kernel locks, interrupted writes) not used "
                         "for %g s", removed, STALE_SECONDS)

        try:
            threading.Thread(target=sweep, daemon=True, name="kernel-lock-sweep").start()
        except RuntimeError as err:  # no thread to be had now: next time
            log.warning("could not start sweeping stale kernel lock files: %s", err)

    def _remember_forgotten(self, kernel_id: str) -> None:
        with self._guard:
            self._forgotten[kernel_id] = time.monotonic() + FORGOTTEN_SECONDS
            self._forgotten.move_to_end(kernel_id)
            if len(self._forgotten) > FORGOTTEN:
                self._forgotten.popitem(last=False)

    def _was_forgotten(self, kernel_id: str) -> bool:
        """For FORGOTTEN_SECONDS: long enough for those that waited for the kernel; later
        callers ask the server (which by then has removed the kernel, and says so at once)."""
        with self._guard:
            return self._forgotten.get(kernel_id, 0.0) > time.monotonic()

    def _wait_turn(self, kernel_id: str, turns: _Turns, my_turn: _Turn, deadline: float,
                   cancelled: Callable[[], bool] | None) -> bool:
        try:
            if _wait(my_turn, deadline, cancelled):
                return True
        except BaseException:  # `cancelled` failed: leave the line, or pass the kernel on
            if not self._leave_line(turns, my_turn):
                self._pass_turn(kernel_id, turns)
            raise
        return not self._leave_line(turns, my_turn)

    def _leave_line(self, turns: _Turns, my_turn: _Turn) -> bool:
        """Gives up waiting; False if the kernel was handed over meanwhile (it is held)."""
        with self._guard:
            if my_turn.is_set():
                return False
            self._step_out(turns, my_turn)
            return True

    def _line_up(self, turns: _Turns, turn: _Turn) -> None:
        """Under `_guard`: `turn` waits for the kernel, counted where it is `limited`."""
        turns.waiting.append(turn)
        turns.limited += turn.limited
        self._limited_total += turn.limited

    def _step_out(self, turns: _Turns, turn: _Turn) -> _Turn:
        """Under `_guard`: `turn` waits no more (it gave up, or its wait is over)."""
        turns.waiting.remove(turn)
        turns.limited -= turn.limited
        self._limited_total -= turn.limited
        return turn

    def _pass_turn(self, kernel_id: str, turns: _Turns) -> None:
        with self._guard:
            if turns.waiting:
                self._step_out(turns, turns.waiting[0]).set()  # still held: by the next one
            else:
                turns.held = False
                del self._turns[kernel_id]

    @contextmanager
    def _file_lock(self, kernel_id: str, deadline: float,
                   cancelled: Callable[[], bool] | None) -> Iterator[bool]:
        if self._directory is None:
            yield True
            return
        with self._guard:
            waiter = self._parked.pop(kernel_id, None)
        if waiter is None or not waiter.take_over():
            waiter = None
            fd = self._open(kernel_id)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiter = _FlockWaiter(fd, on_done=lambda w: self._unpark(kernel_id, w),
                                      close=self._close)
            except OSError:
                self._close(fd)
                raise
        if waiter is not None:
            try:
                taken = _wait(waiter.taken, deadline, cancelled)
            except BaseException:  # `cancelled` failed
                if waiter.give_up():
                    self._close(waiter.fd)  # it got the lock after all: let go of it
                else:
                    self._park(kernel_id, waiter)
                raise
            if not taken and not waiter.give_up():  # (True: got it as the wait ended)
                self._park(kernel_id, waiter)
                yield False
                return
            fd = waiter.fd
        try:
            gone = os.pread(fd, len(GONE), 0) == GONE
            removed = os.fstat(fd).st_nlink == 0
        except BaseException:
            self._close(fd)
            raise
        if gone or removed:
            # forget() ran in another worker while this waited (it writes "gone" in the file,
            # then removes it); or a sweep or a /tmp cleaner removed the file: the lock is then
            # the new file's.
            self._close(fd)
            if gone:
                self._remember_forgotten(kernel_id)
                raise KernelNotFound(kernel_id)
            with self._file_lock(kernel_id, deadline, cancelled) as acquired:
                yield acquired
            return
        try:
            os.pwrite(fd, f"{os.getpid():<15}\n".encode(), 0)  # see last_user()
            yield True
        finally:
            self._close(fd)  # closing the descriptor releases the flock

    def _open(self, kernel_id: str) -> int:
        return self._opened(self._in_directory(lambda directory: os.open(
            directory / f"{kernel_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)))

    def _in_directory(self, make: Callable[[Path], int]) -> int:
        """`make(directory)`, made again in a new directory if a /tmp cleaner removed it."""
        try:
            return make(self._directory)
        except FileNotFoundError:
            self._directory = private_directory(self._server_url) or self._directory
            return make(self._directory)

    def _park(self, kernel_id: str, waiter: _FlockWaiter) -> None:
        """Leaves a given-up flock wait for the kernel's next caller to take over."""
        with self._guard:
            self._parked[kernel_id] = waiter

    def _unpark(self, kernel_id: str, waiter: _FlockWaiter) -> None:
        with self._guard:
            if self._parked.get(kernel_id) is waiter:
                del self._parked[kernel_id]


class _Turns:
    """Who holds one kernel in this process, and who waits for it, first come first served."""

    def __init__(self) -> None:
        self.held = False
        self.waiting: deque[_Turn] = deque()
        self.limited = 0  # how many of those waiting count towards `max_waiting`


class _Turn(threading.Event):
    """Set when the kernel is handed to its waiter."""

    def __init__(self, limited: bool) -> None:
        super().__init__()
        self.limited = limited


class _FlockWaiter:
    """A thread blocked in `flock` on a kernel's lock file: flock has no timeout, so the
    caller waits for it with its deadline, and the lock passes from worker to worker the moment
    it is released, with no polling.

    A caller whose deadline passes gives it up; the kernel's next caller in this process takes
    it over rather than starting another, so a process never has more than one such thread
    (and descriptor) per kernel. Given up and not taken over, it lets go of the lock (closes
    the descriptor) as soon as it gets it.
    """

    def __init__(self, fd: int, on_done: Callable[[_FlockWaiter], None],
                 close: Callable[[int], None] = os.close) -> None:
        self.fd = fd
        self.taken = threading.Event()
        self._on_done = on_done
        self._close = close
        self._state = threading.Lock()
        self._wanted = True
        self._closed = False
        threading.Thread(target=self._wait, daemon=True, name="kernel-lock-waiter").start()

    def _wait(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        with self._state:
            self.taken.set()
            if self._wanted:
                return
            self._close(self.fd)
            self._closed = True
        self._on_done(self)

    def give_up(self) -> bool:
        """Leaves the lock to whoever takes this waiter over; True if it was taken after all."""
        with self._state:
            self._wanted = self.taken.is_set()
            return self._wanted

    def take_over(self) -> bool:
        """Wants the lock again; False if the waiter already let go of it."""
        with self._state:
            self._wanted = not self._closed
            return self._wanted


def _wait(event: threading.Event, deadline: float,
          cancelled: Callable[[], bool] | None) -> bool:
    """`event.wait` until `deadline`, giving up if `cancelled` says so."""
    return _wait_until(event.wait, deadline, cancelled)


def _wait_until(attempt: Callable[[float], bool], deadline: float,
                cancelled: Callable[[], bool] | None) -> bool:
    """Calls `attempt(seconds)` until it succeeds or `deadline` passes; with `cancelled`, in
    slices of `POLL_SECONDS`, giving up as soon as it says True.
    """
    while True:
        seconds = deadline - time.monotonic()
        if cancelled is not None:
            seconds = min(seconds, POLL_SECONDS)
        if attempt(max(seconds, 0)):
            return True
        if time.monotonic() >= deadline or (cancelled is not None and cancelled()):
            return False


def create_held(directory: Path, name: str, data: bytes = b"") -> int:
    """Creates the file `name` in `directory`, holding `data`, and returns a descriptor that
    holds its `flock` until it is closed (or its process dies). The file appears under its name
    only once held and written (it is made under a hidden name, then renamed), so
    `take_if_abandoned` never mistakes a new file for a dead process's, nor reads it half
    written. A file already there under that name is replaced in the same step."""
    hidden = directory / f"{MAKING}{name}"
    fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if data and os.pwrite(fd, data, 0) != len(data):
            raise OSError("short write")
        os.rename(hidden, directory / name)
    except BaseException:
        os.close(fd)
        hidden.unlink(missing_ok=True)
        raise
    return fd


@contextmanager
def take_if_abandoned(path: Path) -> Iterator[int | None]:
    """A file made by `create_held`: yields a descriptor holding it if the process that held
    it is gone (closed after the block), or None while that process lives. Raises
    `FileNotFoundError` if the file is gone, or was removed by another taker meanwhile, or
    replaced by its holder (`create_held` over it: the descriptor is the old file's, which its
    holder let go of after the new one took its name)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        if os.fstat(fd).st_nlink == 0:
            raise FileNotFoundError(path)
        yield fd
    finally:
        os.close(fd)


def lock_directory(server_url: str) -> Path:
    """Where the lock files of this server's kernels are (see `private_directory`)."""
    digest = hashlib.sha256(server_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"jupyter-kernel-proxy-{os.getuid()}" / digest


def private_directory(server_url: str) -> Path | None:
    """A directory only this user can write, for this server's lock files."""
    path = lock_directory(server_url)
    top = path.parent
    try:
        top.mkdir(mode=0o700, exist_ok=True)
        info = top.lstat()  # lstat: a symlink planted by another user is refused below
        if not top.is_dir() or top.is_symlink() or info.st_uid != os.getuid() \
                or info.st_mode & 0o077:
            raise PermissionError(f"{top} is not a private directory")
        path.mkdir(mode=0o700, exist_ok=True)
        _keep(path)
    except OSError as err:
        log.warning("kernel locks are per process only: %s", err)
        return None
    return path


_kept: dict[Path, int] = {}  # directory: a descriptor holding a shared flock on it
_keeping = threading.Lock()


def _keep(path: Path) -> None:
    """Holds a shared `flock` on the directory for as long as this process lives: the age-based
    clean-up of /tmp (systemd-tmpfiles) skips a locked directory, whose files (the job store, a
    pool's list, a lock not taken for days) must not go while the proxy runs."""
    with _keeping:
        try:
            fd = _kept.get(path)
            if fd is not None:
                held, now = os.fstat(fd), path.stat()
                if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                    return
                os.close(_kept.pop(path))  # the directory was removed and made again
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                os.close(fd)
                raise
            _kept[path] = fd
        except OSError as err:  # the locks work all the same
            log.warning("a /tmp cleaner may remove the lock directory's files: %s", err)
