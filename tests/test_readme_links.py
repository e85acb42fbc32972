"""Every link and repository path README names resolves inside the repository (what a newcomer clicks or types)."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md"]
# Paths in running text: a top-level folder of the project, then a path (configs/digits.py:mteo names a file).
PATH = re.compile(r"(?<![\w/.$-])((?:mteo_jax|configs|benchmarks|launch|tests|docs|\.ci)/[\w./*<>-]*)")
LINK = re.compile(r"(?:\]\(|src=\")([^)\"\s]+)")


def anchors(text: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
          for line in text.splitlines() if line.startswith("#")}


def references(doc: str) -> list[tuple[int, str, str]]:
  """(line number, kind, target) of every link, image and repository path in ``doc``."""
  found = []
  for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
    if line.startswith("Not measured yet:"):   # names the file its command will write
      continue
    found += [(number, "link", m.group(1)) for m in LINK.finditer(line)]
    # A placeholder (teacher_<name>) matches anything.
    found += [(number, "path", re.sub(r"<[^>]*>", "*", m.group(1)).rstrip(".,:;")) for m in PATH.finditer(line)]
  return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_and_path_resolves(doc):
  text = (REPO / doc).read_text()
  base = (REPO / doc).parent
  broken = []
  for number, kind, target in references(doc):
    if kind == "link" and target.startswith(("http://", "https://", "mailto:")):
      continue
    if kind == "link" and target.startswith("#"):
      if target[1:] not in anchors(text):
        broken.append(f"{doc}:{number}: anchor {target}")
      continue
    path = target.split("#")[0]
    where = base / path if kind == "link" else REPO / path
    if not glob.glob(str(where)):
      broken.append(f"{doc}:{number}: {target}")
  assert not broken, "\n".join(broken)


def test_the_check_finds_a_broken_path(tmp_path, monkeypatch):
  """The walk can fail: a README naming a missing file, a missing image and a missing anchor is caught."""
  (tmp_path / "README.md").write_text("# Title\n\nSee `configs/nothing.py:mteo`, ![x](docs/none.png), [y](#nowhere) "
                                      "and [z](#title).\n")
  monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
  with pytest.raises(AssertionError) as failure:
    test_every_link_and_path_resolves("README.md")
  message = str(failure.value)
  assert "configs/nothing.py" in message and "docs/none.png" in message and "#nowhere" in message
  assert "#title" not in message
