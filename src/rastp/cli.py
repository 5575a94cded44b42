"""Entry-point wrapper for stage scripts: known problems become one clear line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from rastp.config import ConfigError
from rastp.hardware import keep_freed_memory_for_reuse
from rastp.io import DataError


def run_stage(stage: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> None:
    keep_freed_memory_for_reuse()
    try:
        stage(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as err:  # an input a previous stage should have written
        print(f"error: {err.filename}: file not found (run the stage that writes it first)", file=sys.stderr)
        sys.exit(2)
