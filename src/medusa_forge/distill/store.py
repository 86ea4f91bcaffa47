"""The distill output file: durable appends, resume, and the atomic `.json` list when OUT ends in .json.

JSONL output: one `{"id", "messages"}` line per finished conversation, flushed and fsynced, so a crash
loses only conversations in flight. A line cut short by a crash (no newline, or invalid JSON at the very
end) is cut away on resume and its conversation redone. `.json` output: progress goes to
`OUT.progress.jsonl` the same way; `finalize` writes the whole list to OUT atomically (temp file + rename)
in input order and removes the progress file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from medusa_forge.errors import UserError
from medusa_forge.outputs import OutputLock, check_writable_folder

logger = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the data itself is already fsynced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.final_json = self.path.suffix.lower() == ".json"
        self.progress_path = self.path.with_name(self.path.name + ".progress.jsonl") if self.final_json else self.path
        self.done_ids: set[str] = set()
        self.repaired_torn_line = False
        self._lock = OutputLock(self.path, "distill", "--output-filename")
        self._file = None

    def exists(self) -> bool:
        return self.path.exists() or self.progress_path.exists()

    def open(self, overwrite: bool = False) -> set[str]:
        """Lock the output, start over or load what is done; returns the ids already done."""
        if self.path.is_dir():
            raise UserError(f"--output-filename {self.path}: is a folder; pass a file name such as OUT.jsonl")
        check_writable_folder(self.path.parent, f"--output-filename {self.path}", create=False)
        self._lock.acquire()
        if overwrite:
            for path in {self.path, self.progress_path}:
                path.unlink(missing_ok=True)
        if self.final_json and self.path.exists():
            self.done_ids.update(record["id"] for record in self._read_final_list())
        if self.progress_path.exists():
            self.done_ids.update(record["id"] for record in self._read_progress(repair=True))
        self._file = open(self.progress_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
        return set(self.done_ids)

    def append(self, record: dict) -> None:
        """Write one finished conversation durably; an id is never written twice."""
        if record["id"] in self.done_ids:
            raise ValueError(f"conversation {record['id']!r} is already in {self.progress_path}")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done_ids.add(record["id"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._lock.release()

    def finalize(self, input_order: dict[str, int]) -> int:
        """For `.json` output: write every record so far as one list, atomically (last call before close).

        Returns the number of records in OUT."""
        if not self.final_json:
            return len(self.done_ids)
        self._file.flush()
        records = self._read_final_list() if self.path.exists() else []
        records += self._read_progress(repair=False) if self.progress_path.exists() else []
        records.sort(key=lambda record: input_order.get(record["id"], len(input_order)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(records, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._file.close()  # the list now holds everything; this store is done
        self._file = None
        self.progress_path.unlink()
        return len(records)

    def _read_final_list(self) -> list[dict]:
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(
                f"{self.path} exists but is not a JSON list ({err.msg}, line {err.lineno}); "
                f"pass --overwrite to start over or choose another --output-filename"
            ) from None
        if not isinstance(records, list):
            raise UserError(f"{self.path} exists but is not a JSON list; pass --overwrite or another name")
        for index, record in enumerate(records):
            self._check(record, f"{self.path}: record {index}")
        return records

    def _read_progress(self, repair: bool) -> list[dict]:
        path = self.progress_path
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty unless the last write was cut short
        records, keep_bytes = [], len(data) - len(tail)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines) and not tail:  # the very last line: a torn write
                    keep_bytes -= len(line) + 1
                    break
                raise UserError(
                    f"{path}: line {number} is not valid JSON ({err.msg}); distill never writes such a line "
                    f"in the middle: fix or delete it, or pass --overwrite to start over"
                ) from None
            records.append(self._check(record, f"{path}: line {number}"))
        if keep_bytes < len(data):
            if not repair:
                raise RuntimeError(f"{path} changed while distill was writing it")
            logger.warning("%s: the last line was cut short by an interrupted run; redoing that conversation", path)
            with open(path, "r+b") as handle:
                handle.truncate(keep_bytes)
                handle.flush()
                os.fsync(handle.fileno())
            self.repaired_torn_line = True
        return records

    @staticmethod
    def _check(record: object, where: str) -> dict:
        if not (isinstance(record, dict) and isinstance(record.get("id"), str) and "messages" in record):
            raise UserError(
                f"{where} is not a distill record (expected an object with 'id' and 'messages'); "
                f"pass --overwrite to replace the file, or choose another --output-filename"
            )
        return record
