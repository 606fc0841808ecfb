"""Workdir paths: local and gs:// accepted, other schemes refused up front."""

import os

import pytest

from bnn_jax import paths
from bnn_jax.training import phases
from configs import digits as digits_config


def test_resolve_local_and_gs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("run")) == str(tmp_path / "run")
  assert paths.is_local(paths.resolve("run"))
  gs = paths.resolve("gs://bucket/runs/a")
  assert os.fspath(gs) == "gs://bucket/runs/a" and not paths.is_local(gs)
  assert os.fspath(gs / "teacher") == "gs://bucket/runs/a/teacher"


@pytest.mark.parametrize("workdir,message", [
    ("s3://b/run", "the s3:// scheme is not supported"),
    ("hdfs://nn/run", "the hdfs:// scheme is not supported"),
    ("gs://", "names no bucket"),
])
def test_unusable_workdir_is_refused_before_anything_runs(workdir, message,
                                                          tmp_path,
                                                          monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = digits_config.get_config()
  config.dataset.data_dir = str(tmp_path / "no_data_needed")
  with pytest.raises(ValueError, match=message):
    phases.run(config, workdir)
  assert os.listdir(tmp_path) == []  # Nothing created, nothing read.


def test_write_text_atomic_leaves_no_temporary(tmp_path):
  target = paths.resolve(tmp_path / "results.json")
  paths.write_text_atomic(target, "{}")
  paths.write_text_atomic(target, '{"a": 1}')
  assert target.read_text() == '{"a": 1}'
  assert os.listdir(tmp_path) == ["results.json"]


def test_tree_path():
  import jax  # pylint: disable=g-import-not-at-top
  tree = {"params": {"block": [{"kernel": 0}]}}
  (path, _), = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert paths.tree_path(path) == "params/block/0/kernel"
