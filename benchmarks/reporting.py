"""Where and how the benchmarks write what they measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from peft_any2point.io import atomic_write_text


# Instruction sets that decide the CPU's bf16 matmul speed; machines that share a model name differ in them.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def describe_cpu(cpuinfo: str) -> str | None:
    """`model name (family F, model M; bf16 flags)` of the first processor in a /proc/cpuinfo text, else None.

    The project's 2-core machines all call themselves "AMD EPYC" or "Intel Xeon" but come from different
    generations, whose bf16 matmul peaks differ 5-fold; family, model and flags tell them apart.
    """
    lines = cpuinfo.split("\n\n")[0].splitlines()
    first = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    if "model name" not in first:
        return None
    flags = set(first.get("flags", "").split())
    bf16 = " ".join(flag for flag in _BF16_FLAGS if flag in flags) or "no bf16 matmul instructions"
    return f"{first['model name']} (family {first.get('cpu family', '?')}, model {first.get('model', '?')}; {bf16})"


def cpu_name() -> str:
    """This machine's CPU as `describe_cpu` puts it, or what `platform` knows where there is no /proc/cpuinfo."""
    try:
        described = describe_cpu(CPUINFO.read_text())
    except OSError:
        described = None
    return described or platform.processor() or platform.machine()


def cpu_machine() -> str:
    """`cpu_name()` with the number of cores, as the tables' headers name a CPU machine."""
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def run_stamp() -> dict[str, str]:
    """The machine and the UTC time of a run, for the header of its table."""
    return {
        "machine": cpu_machine(),
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
