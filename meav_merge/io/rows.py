"""Result rows (one dict per line, the same keys) written as CSV, the one format every table here uses."""

from __future__ import annotations

import csv
import os
from typing import Sequence


def write_rows_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """A header from the first row's keys, then one line per row (UTF-8; model text may be in it)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
