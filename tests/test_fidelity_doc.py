"""docs/fidelity.md's training-recipe table names the tests that pin each row: every named test exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_in_the_training_recipe_table_exists():
    text = (ROOT / "docs" / "fidelity.md").read_text()
    section = text.split("## Training recipe", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| aspect")]
    assert len(rows) >= 14
    named = 0
    for row in rows:
        pinned = row.rstrip(" |").rsplit(" | ", 1)[1]
        current = None  # "file.py::a, ::b": a bare ::b is a test of the file named before it
        for match in re.finditer(r"([\w/]*test_\w+\.py)(?:::(\w+))?|::(\w+)", pinned):
            file, test = match.group(1), match.group(2) or match.group(3)
            if file:
                found = sorted(ROOT.glob(f"tests/**/{Path(file).name}"))
                assert found, f"{file} (named in docs/fidelity.md) does not exist"
                current = found[0]
            assert current is not None, row
            if test:
                assert re.search(rf"^def {test}\(", current.read_text(), re.M), f"{current.name}::{test} is missing"
                named += 1
    assert named >= 20
