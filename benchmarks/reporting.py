"""Where and how the benchmarks write what they measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from peft_any2point.io import atomic_write_text


def run_stamp() -> dict[str, str]:
    """The machine and the UTC time of a run, for the header of its table."""
    return {
        "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(output_dir: Path, stem: str, record: dict[str, Any], table: str, echo: bool = True) -> None:
    """`<stem>.json` (the record) and `<stem>.md` (the table), each written atomically; the table is printed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(output_dir / f"{stem}.md", table)
    if echo:
        print(table)


def write_results(output_dir: Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]], table: str) -> None:
    """A sweep's `<stem>.json` ({"meta", "rows"}) and `<stem>.md`, as `write_report` writes them."""
    write_report(output_dir, stem, {"meta": meta, "rows": rows}, table)
