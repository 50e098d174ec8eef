"""The front page and the manual: every relative link resolves, and the words stay the project's own."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                               if name.endswith(".md"))


def _anchors(path: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  with open(path, encoding="utf-8") as f:
    headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
  return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
        os.path.join(ROOT, page)
    if not os.path.exists(resolved):
      broken.append(f"{target}: no such file")
    elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
      broken.append(f"{target}: no heading '#{anchor}'")
  assert not broken, f"{page}: " + "; ".join(broken)


def test_front_page_is_short_and_manual_has_an_index():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    assert len(f.readlines()) <= 250
  with open(os.path.join(ROOT, "docs", "README.md"), encoding="utf-8") as f:
    index = f.read()
  unlisted = [p for p in PAGES if p.startswith("docs") and p != os.path.join("docs", "README.md")
              and f"]({os.path.basename(p)})" not in index]
  assert not unlisted, f"docs/README.md does not list {unlisted}"


def test_the_project_speaks_of_itself_alone():
  found = subprocess.run(
      ["git", "grep", "-nIiE", r"\bsessions?\b|lent to|this (2-core )?(machine|cpu)\b|/work/|/home/[a-z]",
       "--", "README.md", "docs", "msca_jax", "configs", "launch", "benchmarks", ".ci"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  if found.returncode > 1 or "not a git repository" in found.stderr:
    pytest.skip("not a git checkout")
  assert not found.stdout, found.stdout
