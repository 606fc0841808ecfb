"""The package as users install it: a TensorFlow-free core, shipped configs,
and a wheel whose training extra leaves the user's JAX and TensorFlow alone."""

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO

ROOT = pathlib.Path(REPO)

# The modules that must import without TensorFlow (and without clu / TFDS,
# which import it): everything but the training loop and input pipeline.
CORE_MODULES = ("bnn_jax.binary", "bnn_jax.layers", "bnn_jax.models",
                "bnn_jax.summary", "bnn_jax.optim", "bnn_jax.losses",
                "bnn_jax.train_step", "bnn_jax.dynamics", "bnn_jax.checkpoint",
                "bnn_jax.interop.torch_import", "bnn_jax.import_torch",
                "bnn_jax.exact_binary_conv", "bnn_jax.batch_stats",
                "bnn_jax.conv_kernels", "bnn_jax.config_fields")
TENSORFLOW_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu",
                            "tensorflow-intel", "tensorflow-macos",
                            "tf-nightly", "tf-nightly-cpu"}


def test_core_imports_load_no_tensorflow():
  code = ("import sys\n"
          f"for name in {CORE_MODULES!r}:\n"
          "  __import__(name)\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'tensorflow_datasets', 'clu', 'torch'}))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_imports_a_top_level_configs_package():
  """Installed code imports bnn_jax.configs, never a top-level `configs`."""
  offenders = []
  for path in (ROOT / "bnn_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom)
               and node.level == 0 else [])
      offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                    if n == "configs" or n.startswith("configs.")]
  assert not offenders


# ---------------------------------------------------------------------------
# The layout: zones, entry points, the import graph.
# ---------------------------------------------------------------------------
# `python -m bnn_jax.<name>` programs (and their shared preamble, `cli`).
ENTRY_MODULES = {"bnn_jax.main", "bnn_jax.evaluate", "bnn_jax.export",
                 "bnn_jax.benchmark", "bnn_jax.benchmark_input",
                 "bnn_jax.dynamics_benchmark", "bnn_jax.analyze",
                 "bnn_jax.data_service", "bnn_jax.import_torch",
                 "bnn_jax.import_larq", "bnn_jax.configs.__main__",
                 "bnn_jax.cli",
                 # run by `export --format=lce` in Larq's environment
                 "bnn_jax.deploy.export_lce", "bnn_jax.deploy.export_lce_zoo"}
# Library zones: what notebooks, the loop and the entry points build on.
LIBRARY_ZONES = ("bnn_jax.optim", "bnn_jax.models", "bnn_jax.interop",
                 "bnn_jax.datasets", "bnn_jax.configs", "bnn_jax.training",
                 "bnn_jax.deploy")
CORE_FILES = ("binary", "layers", "conv_kernels", "exact_binary_conv",
              "batch_stats", "losses", "train_step", "summary", "dynamics",
              "checkpoint", "paths", "config_fields", "config_lib",
              "malloc_defaults", "xla_defaults")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
  """{module: the bnn_jax modules it imports, at the top or in functions}."""
  files = {_module_name(p): p for p in (ROOT / "bnn_jax").rglob("*.py")}
  graph = {}
  for name, path in files.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
          "bnn_jax"):
        for alias in node.names:
          sub = f"{node.module}.{alias.name}"
          found.add(sub if sub in files else node.module)
      elif isinstance(node, ast.Import):
        found.update(a.name for a in node.names
                     if a.name.startswith("bnn_jax"))
    graph[name] = {m for m in found if m in files} - {name}
  return graph


def test_import_graph_has_no_circle():
  graph, state, circles = _import_graph(), {}, []

  def visit(module, path):
    state[module] = "open"
    for other in sorted(graph[module]):
      if state.get(other) == "open":
        circles.append(path[path.index(other):] + [other])
      elif other not in state:
        visit(other, path + [other])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not circles


def test_library_modules_import_no_entry_point_and_not_the_loop():
  """Library code never imports a program (or the CLI preamble), and only
  the phases reach into the training loop; helpers have their own homes."""
  graph = _import_graph()
  library = [m for m in graph if m not in ENTRY_MODULES and (
      m.startswith(LIBRARY_ZONES) or m.split(".")[-1] in CORE_FILES
      and m.count(".") == 1)]
  assert len(library) > 40  # every zone is seen
  offenders = sorted(f"{m} -> {i}" for m in library for i in graph[m]
                     if i in ENTRY_MODULES or (
                         i == "bnn_jax.training.loop"
                         and m != "bnn_jax.training.phases"))
  assert not offenders


def test_every_module_lives_in_a_zone():
  """The top level holds the core, the entry points and two facades."""
  facades = {"bnn_jax.phases", "bnn_jax.packed", "bnn_jax.__init__", "bnn_jax"}
  top = {m for m in _import_graph() if m.count(".") == 1 or m == "bnn_jax"}
  zones = set(LIBRARY_ZONES) | {"bnn_jax.tools"}
  stray = sorted(m for m in top if m not in ENTRY_MODULES | facades | zones
                 and m.split(".")[-1] not in CORE_FILES)
  assert not stray


def load_by_path(name: str, path: str):
  """A config file loaded by path, as ml_collections' config_flags does."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_repo_root_configs_are_the_packaged_ones():
  from bnn_jax import configs  # noqa: PLC0415
  for name in configs.NAMES:
    packaged = configs.path(name)
    assert os.path.isfile(packaged)
    root = load_by_path(f"root_{name}", str(ROOT / "configs" / f"{name}.py"))
    by_path = load_by_path(f"packaged_{name}", packaged)
    assert root.get_config().to_dict() == by_path.get_config().to_dict()
  assert configs.path("digits_adam_vs_sgd:sgd").endswith(
      os.path.join("bnn_jax", "configs", "digits_adam_vs_sgd.py:sgd"))
  with pytest.raises(ValueError, match="no shipped config"):
    configs.path("digit")


def test_configs_dirs_hold_only_configs():
  """Every configs/*.py (but __init__) is a shipped config with get_config;
  the shared bases in bnn_jax/configs are named *_base and say what they
  are."""
  from bnn_jax import configs  # noqa: PLC0415
  root = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                if p.stem != "__init__")
  assert root == sorted(configs.NAMES)
  packaged = sorted(p.stem for p in (ROOT / "bnn_jax" / "configs").glob("*.py")
                    if p.stem not in ("__init__", "__main__"))
  bases = [n for n in packaged if n not in configs.NAMES]
  assert bases == ["analysis_base", "larq_zoo_base"]
  for name in bases:
    base = load_by_path(name, str(ROOT / "bnn_jax" / "configs" / f"{name}.py"))
    assert not hasattr(base, "get_config")
    assert base.__doc__.startswith("Not a config:")


def test_configs_command_usage():
  from bnn_jax import configs  # noqa: PLC0415
  for flag in ("--help", "-h"):
    proc = subprocess.run([sys.executable, "-m", "bnn_jax.configs", flag],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: python -m bnn_jax.configs ")
  proc = subprocess.run([sys.executable, "-m", "bnn_jax.configs", "--bad"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 1 and proc.stderr.startswith("usage: ")
  proc = subprocess.run([sys.executable, "-m", "bnn_jax.configs", "digits"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0 and proc.stdout.strip() == configs.path("digits")


def build_wheel(out_dir: pathlib.Path) -> pathlib.Path:
  """`pip wheel --no-deps .` of the checkout; the path of the wheel.

  With setuptools in this interpreter the build needs no registry
  (--no-build-isolation); otherwise pip fetches setuptools to build.
  """
  try:
    import setuptools  # noqa: F401, PLC0415
    isolation = ["--no-build-isolation"]
  except ImportError:
    isolation = []
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                  *isolation, "-w", str(out_dir), str(ROOT)],
                 check=True, capture_output=True, text=True, timeout=600)
  (wheel,) = out_dir.glob("bnn_jax-*.whl")
  return wheel


@pytest.mark.slow
def test_wheel_training_extra_keeps_the_installed_jax(tmp_path):
  """`pip install --dry-run bnn_jax[train]` over jax 0.10.1: nothing replaced.

  A venv holding jax/jaxlib 0.10.1 (not the lock's 0.10.2) gets the wheel's
  training extra resolved; the plan must install neither JAX nor any
  TensorFlow distribution (the extra needs the TensorFlow already there).
  Needs the package registry (skips without it).
  """
  wheel = build_wheel(tmp_path / "dist")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                 timeout=300)
  pip = [str(venv / "bin" / "python"), "-m", "pip"]
  installed = subprocess.run(pip + ["install", "-q", "jax==0.10.1",
                                    "jaxlib==0.10.1"],
                             capture_output=True, text=True, timeout=900)
  if installed.returncode != 0:
    pytest.skip("cannot install jax 0.10.1 from the package registry: "
                + installed.stderr.strip().splitlines()[-1])
  report = tmp_path / "report.json"
  subprocess.run(pip + ["install", "--dry-run", "-q", "--report", str(report),
                        f"{wheel}[train]"],
                 check=True, capture_output=True, text=True, timeout=900)
  plan = {item["metadata"]["name"].lower().replace("_", "-"):
          item["metadata"]["version"]
          for item in json.loads(report.read_text())["install"]}
  assert plan["bnn-jax"] == "0.1.0"
  assert {"tensorflow-datasets", "clu", "flax", "optax"} <= set(plan)
  assert "jax" not in plan and "jaxlib" not in plan, plan
  assert not TENSORFLOW_DISTRIBUTIONS & set(plan), plan


def test_recipe_links_point_at_existing_sections():
  """Every link to recipe.md#<section> in the repository names a heading."""
  text = (ROOT / "docs" / "recipe.md").read_text()
  anchors = set()
  for line in text.splitlines():
    if line.startswith("#"):
      title = line.lstrip("#").strip().lower()
      # GitHub's slug: drop punctuation except '-' and '_', spaces to '-'.
      anchors.add("".join(c for c in title if c.isalnum() or c in " -_")
                  .replace(" ", "-"))
  files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
  cited = set()
  for name in files:
    if name.endswith((".py", ".md", ".ipynb")):
      cited |= set(re.findall(r"recipe\.md#([a-z0-9_-]+)",
                              (ROOT / name).read_text()))
  assert cited and cited <= anchors, sorted(cited - anchors)
