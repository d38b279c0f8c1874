"""What every benchmark reporter shares: the machine line and saving results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> str:
    """CPU model, cores, Python and (when installed) torch version."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    try:
        import torch
    except ImportError:
        return text
    return f"{text}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def save(name: str, results: dict[str, Any], table: str, out: Path) -> None:
    """Print the markdown table and write ``<name>.json`` and ``<name>.md`` under ``out``."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
