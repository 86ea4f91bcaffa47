"""Where commands write: checked before any work starts (a folder that cannot be written is found now, not at the
first checkpoint), and held by one run at a time (two runs writing one place would interleave their files)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from medusa_forge.errors import UserError


def check_writable_folder(folder: str | Path, label: str, create: bool = True) -> Path:
    """`folder`, created when missing (`create`), after proving a file can be written in it. Errors start with
    `label` (the flag and the value the user gave)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{label}: {folder} is a file, not a folder; pass a folder path")
    if not create and not folder.is_dir():
        raise UserError(f"{label}: folder {folder} does not exist; create it first")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise UserError(
            f"{label}: cannot write in {folder} ({err.strerror or err}); pass a folder you can write to"
        ) from None
    return folder


@contextlib.contextmanager
def removed_if_failed_empty(folder: str | Path) -> Iterator[None]:
    """Remove `folder` again when the work inside fails or is refused and leaves it as it found it: absent before
    and empty now (an output check creates the folder, and a refused command must leave no empty folder behind)."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        raise


class OutputLock:
    """An exclusive lock on an output (file or folder) for the whole run: `OUT.lock` next to it (or, `inside`, a
    `.lock` file in the folder itself: a work folder whose parent may not be writable), removed on release. Its
    holder's pid and command are written beside it (`LOCK.holder`), so a second run on the same output is refused
    at once, naming the run that holds it and what to change."""

    def __init__(
        self, output: str | Path, command: str, flag: str, inside: bool = False, holder: str | None = None
    ) -> None:
        self.output, self.command, self.flag = Path(output), command, flag
        lock_file = self.output.resolve() / ".lock" if inside else Path(str(self.output.resolve()) + ".lock")
        self._lock = FileLock(str(lock_file))
        self._holder_file = Path(str(lock_file) + ".holder")
        self._holder = holder or shlex.join(sys.argv)

    def _held_by(self) -> str:
        """Who holds the lock, as its holder file says (it may be missing for the instant between the holder
        taking the lock and writing the file)."""
        try:
            holder = json.loads(self._holder_file.read_text())
            return f"pid {holder['pid']}: {holder['command']}; "
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
            raise UserError(
                f"another {self.command} run is writing {self.output} ({self._held_by()}lock {self._lock.lock_file}); "
                f"wait for it to finish, or give each run its own {self.flag}"
            ) from None
        except OSError as err:
            raise UserError(
                f"{self.flag} {self.output}: cannot create the lock file {self._lock.lock_file} "
                f"({err.strerror or err}); pass a path in a folder you can write to"
            ) from None
        tmp = self._holder_file.with_name(self._holder_file.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "command": self._holder}) + "\n")
        tmp.replace(self._holder_file)  # whole or absent: a second run reads it at any moment

    def release(self) -> None:
        if self._lock.is_locked:
            self._holder_file.unlink(missing_ok=True)
            self._lock.release()
            Path(self._lock.lock_file).unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
