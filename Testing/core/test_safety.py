"""Nothing in the shipped code can run code hidden in a file, or hand a string to a shell."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p for folder in ("KidneyTumorSeg", "train", "bench", "Resources") for p in (ROOT / folder).rglob("*.py")
)


def _code_lines(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        code = line.split("#", 1)[0]
        if code.strip():
            yield number, code


def test_the_scan_sees_the_code():
    names = {p.name for p in SOURCES}
    assert {"modelfile.py", "trainer.py", "process.py", "KidneyTumorSeg.py"} <= names


def test_no_pickle_module_is_used():
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in SOURCES
        for n, code in _code_lines(p)
        if re.search(r"\bimport\s+(c?pickle|dill|joblib)\b|\b(c?pickle|dill|joblib)\.loads?\(", code)
    ]
    assert not found, f"pickle used at {found}"


def test_every_torch_load_is_weights_only():
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.end() : text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}")
    assert not found, f"torch.load without weights_only=True at {found}"


def test_no_subprocess_runs_through_a_shell():
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in SOURCES
        for n, code in _code_lines(p)
        if re.search(r"shell\s*=\s*True", code)
    ]
    assert not found, f"shell=True at {found}"
