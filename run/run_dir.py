"""One run per output folder: refuse to start a new run over another run's files, and say how to resume one."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.config import UsageError

# Files that only a training run writes: their presence means the folder already holds a run.
_RUN_FILE = re.compile(r"^(log\.txt|checkpoint\.pth(\.prev)?|checkpoint\d{4,}\.pth)$")


def run_files(output_dir: str | Path) -> list[str]:
    """Names of the training-run files (log.txt, checkpoint*.pth) in ``output_dir``, sorted."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if _RUN_FILE.match(p.name))


def check_new_run_dir(output_dir: str | Path) -> None:
    """Raise UsageError when a new (not resumed) run would write into a folder holding another run.

    Appending to another run's log.txt and overwriting its checkpoint.pth mixes the two runs.
    """
    found = run_files(output_dir)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UsageError(
            f"--output_dir {output_dir} already holds another run ({shown}); continue it with --resume auto, "
            "or pass a new --output_dir"
        )


def next_free_run_dir(output_dir: str | Path) -> Path:
    """``output_dir`` if it holds no run, else the first of ``output_dir_2``, ``_3``, ... that does not."""
    folder = Path(output_dir)
    number = 2
    candidate = folder
    while run_files(candidate):
        candidate = folder.with_name(f"{folder.name}_{number}")
        number += 1
    return candidate


def resume_command(argv: Sequence[str] | None, script: str | None = None) -> str:
    """The command line that continues this run: the same flags with ``--resume auto`` (any --resume replaced).

    Args:
        argv: the flags this run was started with (without the program name); None when unknown.
        script: the program, by default ``python <sys.argv[0]>``.
    """
    if argv is None:
        return "the same command with --resume auto"
    kept: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token == "--resume":
            skip_value = True
        elif not token.startswith("--resume="):
            kept.append(token)
    program = script or f"python {Path(sys.argv[0]).name or 'main.py'}"
    return f"{program} {shlex.join([*kept, '--resume', 'auto'])}"
