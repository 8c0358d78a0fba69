"""The README's "Reliability" table, from the test suite's own results.

Runs the reliability-related tests with a JUnit XML report, sorts each test case into a category by where
it lives and what it is called, and prints a Markdown table: how many cases each category has, how many
passed, failed or were skipped. Nothing is counted that pytest did not run.

    python Testing/reliability_table.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FILES = [
    "Testing/cli/test_cli_bad_input.py",
    "Testing/cli/test_reliability.py",
    "Testing/core/test_modelfile.py",
    "Testing/core/test_inference.py",
    "Testing/core/test_safety.py",
    "Testing/core/test_real_data.py",
    "Testing/train/test_training.py",
    "Testing/train/test_plan_cache.py",
    "Testing/train/test_datasets.py",
    "Testing/mrml/test_logic.py",
    "Testing/mrml/test_process.py",
]

# (category, predicate on (file, test name)), first match wins.
CATEGORIES = [
    (
        "Bad input images at the CLI (one message, exit 2, no output)",
        lambda f, n: "test_cli_bad_input" in f and ("image" in n or "folder" in n or "evaluate" in n or "output" in n),
    ),
    (
        "Bad model files and downloads",
        lambda f, n: (
            ("test_cli_bad_input" in f and "model" in n)
            or (
                "test_modelfile" in f
                and any(
                    w in n
                    for w in (
                        "refus",
                        "pickle",
                        "truncat",
                        "wrong",
                        "download",
                        "checksum",
                        "https",
                        "bad",
                        "unknown",
                        "version",
                    )
                )
            )
        ),
    ),
    (
        "Bad options and recipes",
        lambda f, n: (
            ("test_cli_bad_input" in f and "option" in n)
            or ("test_training" in f and ("recipe" in n or "refus" in n))
            or ("test_plan_cache" in f and "refus" in n)
            or ("test_datasets" in f and ("refus" in n or "bad" in n or "mismatch" in n or "reject" in n))
        ),
    ),
    (
        "Interruptions and faults (SIGKILL, full disk, out of memory, cancel, batches)",
        lambda f, n: any(
            w in n
            for w in (
                "sigkill",
                "interrupt",
                "full_disk",
                "out_of_memory",
                "cancel",
                "batch_of_30",
                "failing_command",
                "failing_extra",
                "non_ascii",
                "resume",
            )
        ),
    ),
    ("Properties over random inputs (hypothesis)", lambda f, n: "any_grid" in n or "symmetric_bounded" in n),
    ("Safety scans (no pickle, weights_only, no shell=True, https + SHA-256)", lambda f, n: "test_safety" in f),
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *FILES],
            cwd=ROOT,
            check=False,
        )
        root = ET.parse(report).getroot()  # noqa: S314 - pytest's own report
    counts: dict[str, Counter] = {name: Counter() for name, _ in CATEGORIES}
    for case in root.iter("testcase"):
        file = (case.get("file") or case.get("classname", "")).replace(".", "/")
        name = case.get("name", "")
        category = next((c for c, match in CATEGORIES if match(file, name)), None)
        if category is None:
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts[category][outcome] += 1
    print("| what is tested | cases | passed | failed | skipped |")
    print("|---|---|---|---|---|")
    for name, _ in CATEGORIES:
        c = counts[name]
        print(f"| {name} | {sum(c.values())} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
