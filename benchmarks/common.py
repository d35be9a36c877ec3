"""Helpers shared by the benchmark scripts: machine description and BENCHMARKS.md appends."""

from __future__ import annotations

import datetime
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def machine() -> str:
    """CPU model and core count (or the accelerator's name)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_section(title: str, body: str) -> None:
    """Appends a dated section with the command and machine to BENCHMARKS.md."""
    today = datetime.date.today().isoformat()
    append_lines(
        f"\n## {title}\n\n- date: {today}\n- machine: {machine()}\n- command: `{command()}`\n\n"
        f"{body.rstrip()}"
    )


def append_lines(text: str) -> None:
    """Appends text (plus a newline) to BENCHMARKS.md at once, so partial runs keep their rows."""
    with open(BENCHMARKS_MD, "a") as f:
        f.write(text + "\n")
    print(text, flush=True)
