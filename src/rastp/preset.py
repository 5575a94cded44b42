"""Run a params preset as a DVC experiment: `python -m rastp.preset presets/<name>.yaml [dvc exp run args]`.

A preset is a YAML file of dotted params keys; each becomes `-S key=value`, so the run is an
ordinary experiment (`dvc exp show`, `dvc metrics diff`) and params.yaml stays the one source.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def preset_args(path: Path) -> list[str]:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        sys.exit(f"error: {path}: cannot read preset ({err})")
    if not isinstance(values, dict):
        sys.exit(f"error: {path}: a preset is a mapping of dotted params keys to values")
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *preset_args(Path(argv[0])), *argv[1:]]
    print("$", " ".join(cmd[1:]), flush=True)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
