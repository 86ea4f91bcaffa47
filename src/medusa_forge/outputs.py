"""Where commands write: checked before any work starts (a folder that cannot be written is found now, not at the
first checkpoint), and held by one run at a time (two runs writing one place would interleave their files)."""

from __future__ import annotations

import tempfile
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


class OutputLock:
    """An exclusive lock on an output (file or folder) for the whole run: `OUT.lock` next to it, removed on release.
    A second run on the same output is refused at once with a message saying what to change."""

    def __init__(self, output: str | Path, command: str, flag: str) -> None:
        self.output, self.command, self.flag = Path(output), command, flag
        self._lock = FileLock(str(self.output.resolve()) + ".lock")

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
            raise UserError(
                f"another {self.command} run is writing {self.output} (lock {self._lock.lock_file}); "
                f"wait for it to finish, or give each run its own {self.flag}"
            ) from None
        except OSError as err:
            raise UserError(
                f"{self.flag} {self.output}: cannot create the lock file {self._lock.lock_file} "
                f"({err.strerror or err}); pass a path in a folder you can write to"
            ) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
            Path(self._lock.lock_file).unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
