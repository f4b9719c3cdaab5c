"""Atomic outputs: everything megacpt writes appears complete (temp + rename) or not at all, and an
interrupted job leaves nothing behind.

- **Temporaries.** A file is written under a temp name beside its final path, ``.{name}.{host}-{pid}-{rand}.tmp``
  (`tmp_path_for`, `atomic_path`; `tmp_dir_for` for a directory), then renamed into place (`commit_tmp`) or
  removed (`discard_tmp`). While it lives, the writer holds an ``flock`` on it and this process lists it, so
- **SIGTERM/SIGINT/SIGHUP** (`handle_signals`, installed by the `megacpt` entry point) unwind the command as a
  `KeyboardInterrupt` (`Interrupted`): ``finally`` blocks run, the temporaries are removed, and the entry point
  prints one line (`report_interrupt`: what was interrupted, how to go on; `describe_interrupt` lets a command
  say it) and exits with 128 + the signal number. A second signal, or unwinding for longer than 10 s (a pool
  waiting on a busy worker), removes the temporaries and exits at once.
- **Stale temporaries** (a job killed with -9, a lost node) are removed by the next job writing the same output
  (`claim_output`): the job first takes the output's lock (``.{name}.lock``, held for the whole job; a second
  live job writing the same output is refused), then removes the temporaries of the output's files whose
  flock nobody holds. Another live job's temporaries are locked, so they are never touched. Temporaries of the
  older format (``.{name}.XXXXXXXX.tmp``, no owner) are removed only under the output's lock.
- **Workers** (`quiet_worker`) ignore SIGINT, die silently on SIGTERM and when their parent dies: the parent
  reports the interruption, once.

A filesystem without ``flock`` (some NFS mounts) keeps working: a temporary whose lock cannot be tested is
kept, never removed. Test hook: `pause_for_test` (see there).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from megacpt.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no locks; stale temporaries are then never removed automatically
    fcntl = None

# a temporary younger than this whose owner may be alive is kept even when unlocked: its writer may be
# between creating it and locking it
_YOUNG_S = 60.0
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname().split(".")[0])[:32] or "host"
_TOKEN = re.compile(r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}")
_OLD_TOKEN = re.compile(r"[a-z0-9_]{8}")      # tempfile.mkstemp's names (megacpt before the owner token)
_OLD_DIR_TOKEN = re.compile(r"tmp-\d+")        # convert's old temp dirs: .{name}.tmp-{pid}

_LIVE: dict[str, int] = {}    # this process's temporaries -> the fd holding their flock
_CLAIMS: dict[str, list] = {}  # lock path -> [fd, depth] of the outputs this process claims


# ------------------------------------------------------------------------------------------ temporaries

def _lock_fd(fd: int) -> bool:
    """Take an exclusive flock on ``fd``; False where the filesystem cannot lock."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _new_tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def tmp_path_for(path: str | os.PathLike) -> Path:
    """A new, empty temp file beside ``path`` (same directory: the final rename is atomic), locked and listed
    as this process's until `commit_tmp` or `discard_tmp`."""
    path = Path(path)
    while True:
        tmp = _new_tmp_name(path)
        try:
            # the final file gets the mode a plain open() would give (0666 & ~umask)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    _lock_fd(fd)
    _LIVE[str(tmp)] = fd
    return tmp


def tmp_dir_for(path: str | os.PathLike) -> Path:
    """A new, empty temp directory beside ``path``, locked and listed like `tmp_path_for`'s files."""
    path = Path(path)
    while True:
        tmp = _new_tmp_name(path)
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    fd = os.open(tmp, os.O_RDONLY)
    _lock_fd(fd)
    _LIVE[str(tmp)] = fd
    return tmp


def _release(tmp: str | os.PathLike) -> None:
    fd = _LIVE.pop(str(tmp), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def commit_tmp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the temporary into place (atomic) and forget it."""
    os.replace(tmp, path)
    _release(tmp)


def discard_tmp(tmp: str | os.PathLike) -> None:
    """Remove a temporary (file or directory) if it is still there, and forget it."""
    _remove(Path(tmp))
    _release(tmp)


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            os.unlink(p)


def remove_live_temps() -> list[str]:
    """Remove every temporary this process still has (the last step of an interruption); returns them."""
    gone = []
    for tmp in list(_LIVE):
        with contextlib.suppress(OSError):
            discard_tmp(tmp)
            gone.append(tmp)
    return gone


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced and renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        pause_for_test("atomic-write")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        commit_tmp(tmp, path)
    except BaseException:
        discard_tmp(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- stale temporaries, claims

def _owner_alive(host: str, pid: int) -> bool:
    if host != _HOST:
        return True  # another machine's process: only its lock can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_if_unlocked(p: Path, owner: re.Match | None) -> bool:
    """Remove the temporary ``p`` when no process holds its flock (and, for a young one, its owner is dead)."""
    if str(p) in _LIVE or fcntl is None:
        return False
    try:
        # O_RDWR for files: NFS emulates flock with fcntl locks, which need write access for an exclusive one
        fd = os.open(p, os.O_RDONLY if p.is_dir() else os.O_RDWR)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (a live job's), or a filesystem that cannot tell: keep it
            return False
        if owner is not None and _owner_alive(owner["host"], int(owner["pid"])):
            with contextlib.suppress(OSError):
                if time.time() - os.fstat(fd).st_mtime < _YOUNG_S:
                    return False
        _remove(p)
        return True
    finally:
        os.close(fd)


def remove_stale_temps(files: Iterable[str | os.PathLike], dirs: Iterable[str | os.PathLike] = (),
                       old_format: bool = False) -> list[Path]:
    """Remove the unlocked temporaries of ``files`` (``.{name}.*.tmp`` beside each) and every unlocked
    temporary directly in ``dirs`` (directories the output owns, e.g. ``OUT.shards``). Temporaries of the older
    format (no owner) go only with ``old_format`` (the caller holds the output's lock). Returns what went."""
    want: dict[Path, set[str] | None] = {}
    for f in map(Path, files):
        want.setdefault(f.parent, set()).add(f.name)
    for d in map(Path, dirs):
        want[d] = None
    gone = []
    for d, names in want.items():
        try:
            entries = [e.name for e in os.scandir(d) if e.name.startswith(".") and
                       (e.name.endswith(".tmp") or _OLD_DIR_TOKEN.search(e.name))]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            token = _token_of(entry, names)
            if token is None:
                continue
            owner = _TOKEN.fullmatch(token)
            if owner is None and not old_format:
                continue
            if _remove_if_unlocked(d / entry, owner):
                gone.append(d / entry)
    return gone


def _token_of(entry: str, names: set[str] | None) -> str | None:
    """The token of a temporary's name ``.{name}.{token}.tmp`` (or old ``.{name}.tmp-{pid}``) if ``name`` is one
    of ``names`` (any name when None) and the token has one of the temp formats."""
    if entry.endswith(".tmp"):
        stem = entry[1:-4]
        name, _, token = stem.rpartition(".")
        if _TOKEN.fullmatch(token) or _OLD_TOKEN.fullmatch(token):
            return token if names is None or name in names else None
    name, _, token = entry[1:].rpartition(".")
    if _OLD_DIR_TOKEN.fullmatch(token) and (names is None or name in names):
        return token
    return None


def _lock_path(output: str | os.PathLike) -> Path:
    p = Path(output)
    return p.with_name(f".{p.name}.lock")


@contextlib.contextmanager
def claim_output(output: str | os.PathLike, files: Iterable[str | os.PathLike] | None = None,
                 dirs: Iterable[str | os.PathLike] = ()) -> Iterator[None]:
    """Hold ``output``'s lock for the block, after removing the stale temporaries of its ``files`` (default:
    ``output`` itself) and of the directories it owns. ``output`` is a file, a directory or a dataset prefix.

    Raises UserError when another live job holds the lock. Re-entrant within a process (preprocess claims the
    merged dataset, and so does the merge it runs)."""
    lock = _lock_path(output)
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock.resolve())
    if key in _CLAIMS:
        _CLAIMS[key][1] += 1
        try:
            yield
        finally:
            _CLAIMS[key][1] -= 1
        return
    fd = _take_lock(lock, output)
    _CLAIMS[key] = [fd, 1]
    try:
        remove_stale_temps([output] if files is None else files, dirs, old_format=fd is not None)
        yield
    finally:
        _CLAIMS.pop(key, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still holding it: a waiting opener re-checks the inode
            with contextlib.suppress(OSError):
                os.close(fd)


def _take_lock(lock: Path, output) -> int | None:
    """The fd holding ``lock`` (None where the filesystem cannot lock)."""
    if fcntl is None:
        return None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{output} is being written by another live job ({holder or 'unknown'}; lock {lock});"
                            " wait for it to finish or choose another output") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EINVAL):
                return None
            raise
        try:  # its previous holder may have unlinked the file between our open and flock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def _forget_after_fork() -> None:
    """In a forked child (a worker): its parent's temporaries and claims are not its own."""
    for fd in [*_LIVE.values(), *(c[0] for c in _CLAIMS.values())]:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # the parent's copy keeps the lock
    _LIVE.clear()
    _CLAIMS.clear()
    if _SIGNALS.installed:
        _SIGNALS.installed = {}
        quiet_signals()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


# ---------------------------------------------------------------------------------------- interruption

class Interrupted(KeyboardInterrupt):
    """A termination signal arrived (SIGINT too: it is a `KeyboardInterrupt`). ``note`` says what was
    interrupted and how to go on (`describe_interrupt`)."""

    def __init__(self, signum: int, note: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = int(signum), note


class _SignalState:
    installed: dict[int, Any] = {}
    pending: int | None = None
    deadline: threading.Timer | None = None


_GRACE_S = 10.0  # seconds a command may take to unwind after a signal before it is ended


_SIGNALS = _SignalState()
_HANDLED = ("SIGTERM", "SIGINT", "SIGHUP")


def _on_signal(signum, frame) -> None:
    if _SIGNALS.pending is not None:  # a second signal while the first unwinds: stop now
        remove_live_temps()
        os._exit(128 + signum)
    _SIGNALS.pending = signum
    _SIGNALS.deadline = threading.Timer(_GRACE_S, _force_exit, (signum,))
    _SIGNALS.deadline.daemon = True
    _SIGNALS.deadline.start()
    raise Interrupted(signum)


def _force_exit(signum: int) -> None:
    remove_live_temps()
    with contextlib.suppress(OSError):
        os.write(2, f"megacpt: interrupted by {signal.Signals(signum).name}; still stopping after {_GRACE_S:g} s: "
                    "ended (temporaries removed)\n".encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise `Interrupted` in the main thread for the block (where their handler is
    the default one: an ignored signal stays ignored). A handler installed inside the block (train's SIGTERM ->
    checkpoint and stop) takes precedence and may chain to this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for name in _HANDLED:
        s = getattr(signal, name, None)
        if s is not None and signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
            old[s] = signal.signal(s, _on_signal)
    outer = _SIGNALS.installed, _SIGNALS.pending
    _SIGNALS.installed, _SIGNALS.pending = {**_SIGNALS.installed, **old}, None
    try:
        yield
    finally:
        if _SIGNALS.deadline is not None:
            _SIGNALS.deadline.cancel()
            _SIGNALS.deadline = None
        for s, h in old.items():
            signal.signal(s, h)
        _SIGNALS.installed, _SIGNALS.pending = outer


@contextlib.contextmanager
def describe_interrupt(describe: Callable[[], str]) -> Iterator[None]:
    """If the block is interrupted, ``describe()`` (called then) says what was interrupted and how to go on,
    e.g. "after 12,345 documents; nothing was written to OUT; re-run the same command". The innermost wins."""
    try:
        yield
    except KeyboardInterrupt as e:
        if getattr(e, "note", None) is None:
            with contextlib.suppress(Exception):
                e.note = describe()
        raise


def report_interrupt(command: str, e: KeyboardInterrupt) -> int:
    """The interruption's one line on stderr (after removing any temporary left); returns 128 + signal."""
    remove_live_temps()
    signum = getattr(e, "signum", int(signal.SIGINT))
    note = getattr(e, "note", None) or "; its temporary files were removed; re-run the same command"
    sep = "" if note.startswith(";") else " "
    print(f"{command}: interrupted by {signal.Signals(signum).name}{sep}{note}", file=sys.stderr, flush=True)
    return 128 + signum


def quiet_signals() -> None:
    """In a worker process: ignore SIGINT (the parent handles Ctrl-C for the whole group) and die silently on
    SIGTERM (how a pool ends its workers)."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def quiet_worker() -> None:
    """Call first in a worker process's initializer: `quiet_signals`, and die with the parent (Linux: a
    parent killed with -9 takes its workers along, so none lingers or prints a broken-pipe traceback)."""
    quiet_signals()
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def pause_for_test(point: str) -> None:
    """Fault-injection hook: with ``MEGACPT_TEST_PAUSE=POINT:FLAG`` in the environment, reaching ``point``
    creates the file FLAG and sleeps 120 s, so a test can signal the process exactly there (tests/faults.py).
    Points: ``atomic-write`` (an `atomic_path` temporary written, not renamed), ``preprocess-start`` (the output
    temporaries exist, empty), ``preprocess-write`` (the first chunk is in them), ``indexed-finalize`` (a dataset's
    `.idx` temporary is written, nothing renamed yet), ``select-write``, ``convert-write`` (a safetensors shard
    is in the temp dir), ``score-shard`` (a score shard committed)."""
    spec = os.environ.get("MEGACPT_TEST_PAUSE")
    if spec and spec.partition(":")[0] == point:
        Path(spec.partition(":")[2]).touch()
        time.sleep(120)


# --------------------------------------------------------------------------------------------- misc

def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path``'s parent if needed and fail early, clearly, if it cannot be written."""
    parent = Path(path).parent if not Path(path).is_dir() else Path(path)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".megacpt-write-check."):
            pass
    except OSError as e:
        raise UserError(f"output directory {parent} is not writable: {e.strerror or e}") from e
    return parent


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
