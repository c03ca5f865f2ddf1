"""Running DVC and git for the study's tools: this environment's `dvc` first on PATH.

`biasdd-grid`, `biasdd-report` and `biasdd-cluster` start `dvc` as subprocesses; DVC in turn starts its
queue workers as `dvc` from PATH, and the stages call `python`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CLUSTER_STATUS = Path("reports") / "cluster-status.json"  # written by biasdd-cluster, relative to the repo


def dvc_executable() -> str:
    """`dvc` from this interpreter's environment when it is there (an un-activated venv), else PATH's."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def tool_command(command: Sequence[str]) -> list[str]:
    """`command` with a leading `dvc` replaced by `dvc_executable()` (other commands as they are)."""
    return [dvc_executable(), *command[1:]] if command and command[0] == "dvc" else list(command)


def tool_environment() -> dict[str, str]:
    """The environment for `dvc` subprocesses: this interpreter's bin folder first on PATH, because
    DVC starts its queue workers as `dvc` from PATH and the stages call `python`; from an un-activated
    venv they would otherwise find another installation, or none (the worker then never starts)."""
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}"}


def run_tool(cmd: Sequence[str], repo: Path) -> subprocess.CompletedProcess:
    """`cmd` in `repo` with this environment's tools (`tool_command`, `tool_environment`), output captured."""
    return subprocess.run(
        tool_command(cmd), cwd=repo, capture_output=True, text=True, check=False, env=tool_environment()
    )
