"""notebooks/quickstart.ipynb runs end to end against the installed wheel.

The notebook's kernel runs in a fresh venv (seeing this interpreter's
packages, so the locked dependencies are there without a download) whose
only bnn_jax is the wheel the notebook's own install cell puts there
(`BNN_JAX_WHEEL`), with a working directory outside the checkout: what a
Colab user gets, not the checkout on sys.path.
"""

import json
import os
import subprocess
import sys
import sysconfig

import nbclient
import nbformat
import pytest

from test_packaging import build_wheel  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.slow

from conftest import REPO
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def make_venv_kernel(tmp_path) -> str:
  """A venv that sees this interpreter's packages, and a Jupyter kernel in it.

  `venv --system-site-packages` would expose the base interpreter's packages,
  not those of the (virtual) environment running the tests, so a .pth file
  adds the latter's site-packages instead.
  """
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                 timeout=300)
  site = subprocess.run(
      [str(venv / "bin" / "python"), "-c",
       "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip()
  parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(site, "test_parent_env.pth"), "w") as f:
    f.write("\n".join(sorted(parent)) + "\n")
  spec_dir = tmp_path / "jupyter" / "kernels" / "bnn_wheel"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher",
               "-f", "{connection_file}"],
      "display_name": "bnn_jax wheel", "language": "python"}))
  return str(venv)


@pytest.mark.slow
def test_quickstart_notebook_runs_against_the_installed_wheel(tmp_path,
                                                              monkeypatch):
  wheel = build_wheel(tmp_path / "dist")
  venv = make_venv_kernel(tmp_path)
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.delenv("PYTHONPATH", raising=False)
  # The notebook's install cell: pip install <wheel>[train], offline (every
  # dependency is already in the system site-packages).
  monkeypatch.setenv("BNN_JAX_WHEEL", str(wheel))
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  # 2 epochs per phase (the per-epoch linear decay runs the first at half
  # the base rate, the last at 0) at quarter width, fresh directories, and
  # the tests' fast-compile setting (conftest); the kernel inherits the
  # environment.
  monkeypatch.setenv("QUICKSTART_EPOCHS", "2")
  monkeypatch.setenv("QUICKSTART_WIDTH", "0.25")
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("QUICKSTART_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  work = tmp_path / "cwd"  # not the checkout: `import bnn_jax` is the wheel
  work.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="bnn_wheel",
                                   resources={"metadata": {"path": str(work)}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  streams = " ".join(o.get("text", "") for o in outputs
                     if o.output_type == "stream")
  assert f"from {venv}/lib/" in streams  # the wheel, not the checkout
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # pseudo-gradients, flip ratios, analyze's plot
  assert os.path.exists(tmp_path / "run" / "analysis" / "dynamics.png")
  texts = " ".join(o.get("data", {}).get("text/plain", "") for o in outputs)
  assert "'step2'" in texts  # the results of the three phases
  # The registered chain trained step 2, its learning rate logged.
  with open(tmp_path / "run_clipped_lion" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  lrs = [r["train/lr"] for r in records
         if r.get("phase") == "step2" and "train/lr" in r]
  assert lrs and lrs[0] > 0 and max(lrs) <= 1.25e-4
