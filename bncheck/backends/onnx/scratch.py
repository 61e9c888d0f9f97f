"""The probe's scratch folders: where it writes the files that live only while it runs (the statistics-first
session's optimized graph and weights, a copy of weights stored as float_data), and their clean-up.

tempfile and shutil are imported where a folder is made or removed: most probes make none, and the two
imports cost about as much as making and removing the folder many times over."""

from __future__ import annotations

import contextlib
import os

from bncheck import watchdog

#: RAM-backed folder for the probe's short-lived files (Linux); used only with room to spare
RAM_FOLDER = "/dev/shm"
#: free space it must have, in multiples of the model's bytes
RAM_FOLDER_MARGIN = 4


def scratch_folder(model_bytes: int, swept: str | None = None) -> str:
    """A new folder for files that live only while a probe runs (the statistics-first session's optimized
    weights, a copy of weights stored as float_data). In RAM when :data:`RAM_FOLDER` has room for the
    model's bytes :data:`RAM_FOLDER_MARGIN` times over and TMPDIR does not name another place: writing the
    optimized weights of ResNet-50 to a disk-backed /tmp cost 0.07 s of session building. The page cache
    would hold the same bytes in RAM; a RAM folder only spares the file system its block allocation and
    write-back. ``swept``: a parent whose orphans were just removed (not listed again)."""
    if not os.environ.get("TMPDIR") and os.path.isdir(RAM_FOLDER) and os.access(RAM_FOLDER, os.W_OK):
        try:
            stats = os.statvfs(RAM_FOLDER)
            if stats.f_bavail * stats.f_frsize >= RAM_FOLDER_MARGIN * max(model_bytes, 1):
                return _new_scratch(RAM_FOLDER, sweep=swept != RAM_FOLDER)
        except OSError:
            pass
    import tempfile

    parent = tempfile.gettempdir()
    return _new_scratch(parent, sweep=swept != parent)


#: scratch folders are named SCRATCH_PREFIX + "<pid namespace>-<pid>-": see _remove_orphans
SCRATCH_PREFIX = "bncheck-probe-"


def _new_scratch(parent: str, sweep: bool = True) -> str:
    if sweep:
        _remove_orphans(parent, _namespace_prefix())
    watchdog.at_stop(_remove_own_scratch)
    import tempfile

    return tempfile.mkdtemp(prefix=_own_prefix(), dir=parent)


def _namespace_prefix() -> str:
    """The start of the scratch folders' names of every process of this pid namespace (see SCRATCH_PREFIX)."""
    return f"{SCRATCH_PREFIX}{_pid_namespace()}-"


def _own_prefix() -> str:
    """The start of this process's scratch folders' names."""
    return f"{_namespace_prefix()}{os.getpid()}-"


def _remove_own_scratch() -> None:
    """Remove every scratch folder of this process: what the ``finally`` blocks do, for a stop that runs none."""
    import tempfile

    owner = _own_prefix()
    for parent in {RAM_FOLDER, tempfile.gettempdir()}:
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                if name.startswith(owner):
                    _remove(os.path.join(parent, name))


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (containers sharing /dev/shm number their processes apart);
    0 where the system has none to show."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _remove_orphans(parent: str, owner: str) -> None:
    """Remove the scratch folders in ``parent`` of processes (of this pid namespace) that no longer exist: a
    probe killed outright (SIGKILL, the kernel's OOM killer) runs no clean-up, and a folder in /dev/shm holds
    its bytes in RAM until a reboot. POSIX only: elsewhere os.kill(pid, 0) would end the process."""
    if os.name != "posix":
        return
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(owner) :].split("-", 1)[0] if name.startswith(owner) else ""
        if pid.isdigit() and not _alive(int(pid)):
            _remove(os.path.join(parent, name))


def _remove(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, among others: alive
        return True
    return True


class Scratch:
    """A scratch folder made on first use: most probes write no file (onnxruntime reads the weights from the
    model's own file, and nothing is added to the graph), and skip the folder and its clean-up. The orphans
    in :data:`RAM_FOLDER`, whose bytes hold RAM, are removed all the same (a listing); those elsewhere when
    a folder is made beside them."""

    def __init__(self, model_bytes: int) -> None:
        self.model_bytes = model_bytes
        self._path: str | None = None
        _remove_orphans(RAM_FOLDER, _namespace_prefix())

    @property
    def made(self) -> str | None:
        """The folder if it was made (and not removed since), else None."""
        return self._path

    @property
    def path(self) -> str:
        """The folder, made now if it was not."""
        if self._path is None:
            self._path = scratch_folder(self.model_bytes, swept=RAM_FOLDER)
        return self._path

    def remove(self) -> None:
        """Remove the folder and its files, if it was made; a later :attr:`path` makes a new one."""
        if self._path is not None:
            _remove(self._path)
            self._path = None
