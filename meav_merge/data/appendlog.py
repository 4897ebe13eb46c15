"""An append-only JSONL file that survives being killed at any moment.

Every object is written as one whole line and fsync'ed before the next, so after a
crash the file holds every acknowledged line plus, at worst, one partial last line
(no trailing newline); opening the file again cuts that partial line off. Long
resumable jobs (synthesis, LLM judging) keep their results in one of these and skip,
on restart, the ids already present.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, List, Optional

from meav_merge.data.schema import DataError, dumps_line, jsonl_lines


class AppendOnlyJsonl:
    """Open (creating if needed) ``path`` for appending; ``existing`` holds the objects already there."""

    def __init__(self, path: str | os.PathLike, force: bool = False,
                 check: Optional[Callable[[dict, str], None]] = None):
        """``check(obj, "file:line")`` may raise DataError for an existing line the caller cannot resume from."""
        self.path = Path(path)
        self._check = check
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if force and self.path.exists():
            self.path.unlink()
        self.repaired_tail = self._truncate_partial_tail()
        self.existing: List[dict] = self._read_existing()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def _truncate_partial_tail(self) -> bool:
        if not self.path.is_file():
            return False
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return False
            f.truncate(data.rfind(b"\n") + 1)  # rfind is -1 when the only line is partial: truncate(0)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read_existing(self) -> List[dict]:
        if not self.path.is_file():
            return []
        found = []
        try:
            lines = jsonl_lines(self.path.read_bytes())  # "\n" only: answers may hold U+2028
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 ({e.reason})") from None
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # Only the last line can be cut by a kill, and that was removed above;
                # a bad line in the middle is someone's edit, which we must not drop.
                raise DataError(f"{self.path}:{ln}: invalid JSON ({e.msg} at column {e.colno}); "
                                "fix or remove the line before resuming") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                raise DataError(f"{self.path}:{ln}: not a record (needs a string 'id')")
            if self._check is not None:
                self._check(obj, f"{self.path}:{ln}")
            found.append(obj)
        return found

    def append(self, obj: dict) -> None:
        line = (dumps_line(obj) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:  # os.write may write less than asked
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "AppendOnlyJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
