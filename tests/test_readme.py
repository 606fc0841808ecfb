"""README.md as a front door: its Python example runs and prints what it says,
its links resolve, and docs/README.md indexes every page of docs/.

(Command 1 of the quick start runs in tests/test_first_run.py; command 2 is
this suite.)
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")


def _readme() -> str:
  with open(README) as f:
    return f.read()


@pytest.mark.slow  # builds ReActNet-A (about 50 s under load)
def test_python_example_prints_what_its_comments_say():
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  assert len(blocks) == 1
  code = blocks[0]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a notebook has
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  printed = out.stdout.strip().splitlines()
  # The comment under the first print is its output.
  expected = re.search(r"^# (\[.*)$", code, re.M).group(1)
  assert printed[0] == expected
  params, binary_params, bops = re.fullmatch(
      r"([\d,]+) parameters, ([\d,]+) binary, (\S+) BOPs", printed[1]).groups()
  assert int(binary_params.replace(",", "")) < int(params.replace(",", ""))
  assert float(bops) > 0
  assert len(_readme().splitlines()) <= 130


def test_links_resolve_and_docs_index_lists_every_page():
  for source in (README, os.path.join(REPO, "docs", "README.md")):
    with open(source) as f:
      text = f.read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
      if "://" in target:
        continue
      path = os.path.join(os.path.dirname(source), target)
      assert os.path.exists(path), f"{source}: {target}"
  with open(os.path.join(REPO, "docs", "README.md")) as f:
    index = f.read()
  pages = sorted(p for p in os.listdir(os.path.join(REPO, "docs"))
                 if p.endswith(".md") and p != "README.md")
  assert pages and [p for p in pages if f"]({p})" not in index] == []
