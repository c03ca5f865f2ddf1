"""Stage-by-stage wall time of `dvc repro` of the whole DAG on the tests' tiny config, for the checkout
in the current directory; prints one line (total and each stage's seconds, from DVC's "Running stage"
lines). What the end-to-end tests pay per stage.

    python benchmarks/tiny_pipeline_times.py /tmp/tiny-now now
    git worktree add /tmp/then <commit>
    (cd /tmp/then && PYTHONPATH=src python "$OLDPWD/benchmarks/tiny_pipeline_times.py" /tmp/tiny-then then)

Run the two alternately to compare versions. Older checkouts (before tests/tiny.py had `make_repo`)
built the tiny repository with tests/test_pipeline.py's helpers; both layouts are handled.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")  # the checkout's tests package


def _make_repo(dest: Path) -> tuple[Path, dict[str, str]]:
    try:
        from tests.tiny import env, make_repo

        return make_repo(dest), env()
    except ImportError:  # the layout before tests/tiny.py held the repository helpers
        from tests.test_pipeline import _env, make_repo
        from tests.tiny import make_tiny

        return make_repo(dest, make_tiny), _env()


def main() -> None:
    dest, label = Path(sys.argv[1]), sys.argv[2]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    repo, env = _make_repo(dest)
    begin = time.perf_counter()
    times: dict[str, float] = {}
    stage, start = None, begin
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Running stage"):
            now = time.perf_counter()
            if stage:
                times[stage] = now - start
            stage, start = line.split("'")[1], now
    proc.wait()
    end = time.perf_counter()
    if stage:
        times[stage] = end - start
    stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in times.items())
    print(f"{label}: rc {proc.returncode}, {end - begin:.1f} s in all; {stages}")


if __name__ == "__main__":
    main()
