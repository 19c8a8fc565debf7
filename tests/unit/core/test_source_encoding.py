"""Text decoded from a subprocess must name its encoding.

`subprocess.run(..., text=True)` decodes with the locale's encoding, which is ASCII where no
locale is set (CI, cron, many SLURM nodes); a report or a log with one non-ASCII byte then
raises UnicodeDecodeError. Ruff's PLW1514 covers `open()` and `Path.read_text()`, not subprocess.
"""

import ast

from helpers.paths import ROOT

SOURCES = sorted(p for d in ("maisi", "workflow_scripts", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))


def locale_decoded_calls(source: str) -> list[int]:
    """Line numbers of calls that ask for text (`text=` / `universal_newlines=`) without an `encoding=`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            names = {k.arg for k in node.keywords}
            if names & {"text", "universal_newlines"} and "encoding" not in names:
                lines.append(node.lineno)
    return lines


def test_scanner_finds_a_locale_decoded_call():
    assert locale_decoded_calls("import subprocess\nsubprocess.run(['ls'],\n  text=True)\n") == [2]
    assert locale_decoded_calls("subprocess.run(['ls'], encoding='utf-8')\n") == []


def test_subprocess_text_names_its_encoding():
    found = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n in locale_decoded_calls(p.read_text(encoding="utf-8"))]
    assert len(SOURCES) > 50
    assert found == [], f"pass encoding='utf-8' instead of text=True at {found}"
