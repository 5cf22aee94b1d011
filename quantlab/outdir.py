"""Output folders: an exclusive lock, checks before any work, the final swap, and what a failed run leaves.

Beside an output folder `<dir>/<name>` a run uses (all documented in docs/errors.md):
  .<name>.lock          {"pid", "host", "start", "command"}; taken before any work, removed at exit
  .<name>.tmp-<pid>     the checkpoint being written; renamed to <name> when everything succeeded
  <name>.resume/        finished layers of an unfinished run (quantlab.resume); removed on success
  <name>.failed.log     the log of the last failed run (when there is no resume folder to hold it)
A lock whose process is gone (same host, pid dead or reused) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import InputError, OutputLockedError, environment_failure

log = logging.getLogger(__name__)

FAILED_LOG = "failed-run.log"


def lock_path(out_dir: Path) -> Path:
    """The lock file of out_dir."""
    return out_dir.parent / f".{out_dir.name}.lock"


def resume_dir(out_dir: Path) -> Path:
    """Where finished layers of an interrupted run for out_dir are kept (visible; removed on success)."""
    return out_dir.parent / f"{out_dir.name}.resume"


def failed_log_path(out_dir: Path) -> Path:
    """Where a failed run's log goes when it has no resume folder."""
    return out_dir.parent / f"{out_dir.name}.failed.log"


def _proc_start(pid: int) -> str | None:
    """Start time of pid in clock ticks since boot (Linux), None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether pid is a live process that is the one recorded (its start time matches)."""
    if sys.platform == "linux":
        now = _proc_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LockInfo:
    """Who holds a lock."""

    pid: int
    host: str
    start: str | None
    command: str
    since: float

    def live(self) -> bool:
        """False only when the holder is certainly gone (same host, dead or reused pid)."""
        return self.host != socket.gethostname() or process_alive(self.pid, self.start)

    def describe(self) -> str:
        """One line naming the holder."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {when} ({self.command})"


def read_lock(path: Path) -> LockInfo | None:
    """The holder recorded in a lock file; None when absent or unreadable (a half-written lock)."""
    try:
        d = json.loads(path.read_text())
        return LockInfo(int(d["pid"]), str(d["host"]), d.get("start"), d["command"], d["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def output_lock(out_dir: Path) -> Iterator[Path]:
    """Hold out_dir's exclusive lock for the block; OutputLockedError naming a live holder."""
    path = lock_path(out_dir)
    created = not out_dir.parent.exists()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise environment_failure(exc, f"creating the folder of {out_dir}") from None
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _proc_start(os.getpid()),
        "command": " ".join(sys.argv)[:300],
        "since": time.time(),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            age = time.time() - path.stat().st_mtime if path.exists() else 0.0
            if holder is not None and holder.live():
                raise OutputLockedError(
                    f"Output folder {out_dir} is in use by another quantlab run: "
                    f"{holder.describe()}. Wait for it to finish, choose another "
                    f"export.output_dir, or, if that process is gone, delete {path}."
                ) from None
            if holder is None and age < 5.0:  # being written right now by another process
                time.sleep(0.2)
                continue
            log.warning(
                "taking over the stale lock %s (%s)",
                path,
                holder.describe() if holder else "unreadable",
            )
            path.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise environment_failure(exc, f"locking the output folder {out_dir}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise OutputLockedError(
            f"Could not take the lock {path} of {out_dir} (another process keeps taking it)."
        )
    try:
        yield path
    finally:
        holder = read_lock(path)
        if holder is not None and holder.pid == os.getpid():
            path.unlink(missing_ok=True)
        if created:  # a folder made only for the lock goes again when the run left nothing
            with contextlib.suppress(OSError):
                out_dir.parent.rmdir()


def check_writable(out_dir: Path, need_bytes: int, key: str = "export.output_dir") -> list[str]:
    """Problems that would stop writing out_dir: not a folder, a mount point, not writable, too little space."""
    problems: list[str] = []
    if out_dir.exists() and not out_dir.is_dir():
        return [f"{key}: {out_dir} is a file; quantlab writes a folder there. Choose another path."]
    if out_dir.is_dir() and os.path.ismount(out_dir):
        problems.append(
            f"{key}: {out_dir} is a mount point. quantlab writes a sibling temporary folder and "
            f"renames it into place, which a mount point cannot take; write into a subfolder "
            f"such as {out_dir / 'checkpoint'}."
        )
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        problems.append(
            f"{key}: cannot write into {parent} (permission denied or read-only). Choose a "
            "folder you can write to."
        )
        return problems
    try:
        probe = parent / f".quantlab-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        problems.append(f"{key}: {environment_failure(exc, f'writing into {parent}')}")
        return problems
    free = shutil.disk_usage(parent).free
    if need_bytes > free:
        problems.append(
            f"{key}: {parent} has {free / 1e9:.2f} GB free; this run needs about "
            f"{need_bytes / 1e9:.2f} GB (checkpoint + reloadable copy + resume state). Free "
            "space or choose a folder on another disk."
        )
    return problems


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap a and b atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished tmp folder to out_dir; an existing out_dir is replaced only with overwrite.

    The old folder is swapped out atomically (or renamed aside first) and deleted only after the
    new one is in place, so no instant leaves neither checkpoint on disk.
    """
    try:
        if not out_dir.exists():
            tmp.rename(out_dir)
            return
        if not overwrite:
            raise InputError(
                f"Output directory {out_dir} appeared while this run was working (not created "
                f"by it); the new checkpoint is kept in {tmp}. Move one of them aside."
            )
        if _rename_exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
            return
        aside = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(aside)
        try:
            tmp.rename(out_dir)
        except OSError:
            aside.rename(out_dir)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as exc:
        raise environment_failure(
            exc, f"moving the finished checkpoint into place (it stays in {tmp})"
        ) from None


def folder_bytes(path: Path) -> int:
    """Total size of the files under path (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Leftover:
    """Something a run left beside an output folder."""

    path: Path
    kind: str  # resume | temporary | replaced | stale-lock | failed-log
    size: int
    removable: bool  # False for a live run's temp folder or lock


def leftovers(folder: Path) -> list[Leftover]:
    """Resume folders, temp folders of dead runs, stale locks and failed-run logs directly in folder."""
    found: list[Leftover] = []
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        n = p.name
        if n.endswith(".resume") and p.is_dir():
            found.append(Leftover(p, "resume", folder_bytes(p), True))
        elif n.startswith(".") and ".tmp-" in n:
            pid = n.rsplit("-", 1)[-1]
            dead = not pid.isdigit() or not process_alive(int(pid), None)
            found.append(Leftover(p, "temporary", folder_bytes(p), dead))
        elif n.startswith(".") and ".old-" in n:
            found.append(Leftover(p, "replaced", folder_bytes(p), True))
        elif n.startswith(".") and n.endswith(".lock"):
            holder = read_lock(p)
            if holder is None or not holder.live():
                found.append(Leftover(p, "stale-lock", folder_bytes(p), True))
        elif n.endswith(".failed.log") and p.is_file():
            found.append(Leftover(p, "failed-log", p.stat().st_size, True))
    return found


def remove(item: Leftover) -> None:
    """Delete one leftover."""
    if item.path.is_dir():
        shutil.rmtree(item.path)
    else:
        item.path.unlink(missing_ok=True)


def keep_failed_log(log_file: Path, out_dir: Path) -> Path | None:
    """Copy a failed run's log into its resume folder (or beside the output); its new path."""
    if not log_file.is_file():
        return None
    rdir = resume_dir(out_dir)
    dest = rdir / FAILED_LOG if rdir.is_dir() else failed_log_path(out_dir)
    try:
        shutil.copyfile(log_file, dest)
    except OSError:
        return None
    return dest


def failure_hint(out_dir: Path, log_copy: Path | None) -> str:
    """What a failed or interrupted run left and what to do with it (printed by the CLI)."""
    parts = []
    rdir = resume_dir(out_dir)
    if (rdir / "progress.json").is_file():
        try:
            done = int(json.loads((rdir / "progress.json").read_text()).get("done", 0))
        except (OSError, ValueError):
            done = 0
        parts.append(
            f"{done} finished layer(s) ({folder_bytes(rdir) / 1e6:.0f} MB) are kept in {rdir}: "
            f"run the same command again to continue from there, or delete them with "
            f"`quantlab clean {out_dir.parent} --yes`."
        )
    if log_copy is not None:
        parts.append(f"The run's log is {log_copy}.")
    return " ".join(parts)
