"""Running the real `weightless` entry point in-process, as a shell would."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from weightless_cli.cli import main


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> Run:
    """Call main() with ``args`` and capture its exit code, stdout and stderr."""
    argv = sys.argv
    sys.argv = ["weightless", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)
