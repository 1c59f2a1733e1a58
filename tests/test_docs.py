"""docs/explainers.md points at code: every function and line it names must be there."""

import re

from conftest import ROOT
from model import reference

PAGE = (ROOT / "docs" / "explainers.md").read_text(encoding="utf-8")
ROWS = [[cell.strip() for cell in line.strip("|").split("|")] for line in PAGE.splitlines()
        if line.startswith("| ") and not line.startswith("| step") and "---" not in line]


def test_every_step_of_the_explainers_has_a_row():
    steps = [row[0] for row in ROWS]
    for step in ("token embedding", "positional embedding", "Q, K, V", "scores and scaling", "causal mask",
                 "softmax", "heads", "add & norm", "feed-forward", "LM head (tied)", "softmax over the vocabulary",
                 "loss", "all of it", "AdamW"):
        assert step in steps, f"docs/explainers.md has no row for {step!r}"


def test_named_reference_functions_exist():
    names = [n for row in ROWS for n in re.findall(r"`(\w+)`", row[2])]
    assert len(names) > 20
    for name in names:
        assert callable(getattr(reference, name, None)), f"docs name reference.{name}, which does not exist"


def test_quoted_torch_lines_are_in_the_code():
    quoted = [re.fullmatch(r"(\w+\.py): `(.+)`", row[3]) for row in ROWS]
    quoted = [m for m in quoted if m]
    assert len(quoted) > 20
    for m in quoted:
        source = (ROOT / "model" / m.group(1)).read_text(encoding="utf-8")
        assert m.group(2) in source, f"docs quote model/{m.group(1)}: {m.group(2)!r}, which is not there"
