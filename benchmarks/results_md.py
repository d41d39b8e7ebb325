"""One place that writes a section of benchmarks/RESULTS.md (shared by every benchmark script)."""

from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\nMachine: the project's standard machine (2 CPU cores, 24 GiB memory, no GPU), Python 3.11.7,\n"
    "torch 2.13.0+cpu, cvxpy 1.9.3. Each section names the script that produced it and its date;\n"
    "re-run it to reproduce. Ratios are computed within one run on the same machine.\n"
)


def write_section(section: str, text: str, path: Path = RESULTS_MD) -> None:
    """Replace the section headed ``section`` (up to the next "## " heading) with ``text``, or
    append it when it is not there yet."""
    current = path.read_text() if path.exists() else HEADER
    if section in current:
        start = current.index(section)
        nxt = current.find("\n## ", start + len(section))
        end = len(current) if nxt < 0 else nxt + 1
        current = current[:start] + text.rstrip() + "\n" + ("\n" if nxt >= 0 else "") + current[end:]
    else:
        current = current.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(current)


def publish(section: str, text: str, write: bool = True) -> None:
    """Print the section, and (``write``) put it into RESULTS.md."""
    if write:
        write_section(section, text)
    print(text)
