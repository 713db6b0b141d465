"""Write one benchmark's section of docs/BENCHMARKS.md, replacing its previous run."""

from __future__ import annotations

import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; re-run the command to refresh it.\n"


def machine() -> str:
    import os

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def write_section(name: str, body: str) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    block = (f"<!-- {name}:start -->\n## {name}\n\nCommand: `{' '.join(['python'] + sys.argv)}`  \n"
             f"Machine: {machine()}\n\n{body.strip()}\n<!-- {name}:end -->")
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
