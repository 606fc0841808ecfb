"""notebooks/quickstart.ipynb runs end to end (tiny budget) under nbclient."""

import os

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  # The kernel inherits the environment: 1 epoch per phase at quarter width,
  # fresh directories, and the tests' fast-compile setting (conftest).
  monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
  monkeypatch.setenv("QUICKSTART_WIDTH", "0.25")
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("QUICKSTART_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # pseudo-gradients, flip ratios, analyze's plot
  assert os.path.exists(tmp_path / "run" / "analysis" / "dynamics.png")
  texts = " ".join(o.get("data", {}).get("text/plain", "") for o in outputs)
  assert "'step2'" in texts  # the results of the three phases
