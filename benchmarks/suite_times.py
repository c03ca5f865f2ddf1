"""Is the test suite slower than an earlier version's? Compare two pytest JUnit reports test by test.

    python -m pytest -q --junitxml=/tmp/now.xml                      # this checkout
    (cd /tmp/biasdd-before && PYTHONPATH=src python -m pytest -q --junitxml=/tmp/before.xml)
    python benchmarks/suite_times.py /tmp/before.xml /tmp/now.xml

A suite that gained tests takes longer in all; what can be compared is the tests both versions have
(same file, same name): their summed time before and now, the slowest of them, and the tests that
exist only on one side. Costs nothing to run (it reads two XML files).
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path


def read(report: Path) -> dict[str, float]:
    """{test id: seconds} of the tests that ran (skipped ones left out)."""
    times = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        times[f"{case.get('classname')}::{case.get('name')}"] = float(case.get("time", 0.0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="JUnit XML of the earlier version's suite")
    parser.add_argument("now", type=Path, help="JUnit XML of this version's suite")
    parser.add_argument("--rows", type=int, default=10, help="largest changes to list")
    args = parser.parse_args()
    before, now = read(args.before), read(args.now)
    common = sorted(before.keys() & now.keys())
    sum_before = sum(before[t] for t in common)
    sum_now = sum(now[t] for t in common)
    print(f"tests in both: {len(common)}; before {sum_before:.1f} s, now {sum_now:.1f} s "
          f"(now / before = {sum_now / max(sum_before, 1e-9):.2f})")  # fmt: skip
    only_now = now.keys() - before.keys()
    only_before = before.keys() - now.keys()
    print(f"only now: {len(only_now)} tests, {sum(now[t] for t in only_now):.1f} s; "
          f"only before: {len(only_before)} tests, {sum(before[t] for t in only_before):.1f} s")  # fmt: skip
    print(f"whole suites: before {sum(before.values()):.1f} s, now {sum(now.values()):.1f} s")
    print("largest changes among the tests in both (now - before):")
    for test in sorted(common, key=lambda t: abs(now[t] - before[t]), reverse=True)[: args.rows]:
        print(f"  {now[test] - before[test]:+7.1f} s  {before[test]:6.1f} -> {now[test]:6.1f}  {test}")


if __name__ == "__main__":
    main()
