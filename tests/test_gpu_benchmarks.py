"""The GPU side-by-side tooling: row runner, trace summary, markdown tables.

The GPU script itself (`benchmarks/gpu_side_by_side.sh`) is checked end to end
by `BNN_GPU_SMOKE=1` (minutes on a CPU); these tests cover its parts on
synthetic inputs, plus one tiny PyTorch row where torch is installed.
"""

import gzip
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import run_row
from benchmarks import summarize_gpu
from benchmarks import trace_summary

from conftest import REPO


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_run_row_records_result_failure_timeout_and_skip(tmp_path):
  rows, log = str(tmp_path / "rows.jsonl"), str(tmp_path / "run.log")
  common = [f"--rows={rows}", f"--log={log}", "--min_s=0"]
  py = sys.executable
  run_row.main(common + ["--name=ok", "--timeout=60", "--env", "A=7", "--",
                         py, "-c", "import os; print('noise'); "
                         "print('{\"images_per_s\": 5.0, \"a\": %s}' "
                         "% os.environ['A'])"])
  run_row.main(common + ["--name=fails", "--timeout=60", "--", py, "-c",
                         "import sys; print('{\"partial\": 1}'); "
                         "sys.exit('boom')"])
  run_row.main(common + ["--name=slow", "--timeout=1", "--", py, "-c",
                         "import time; time.sleep(30)"])
  run_row.main(common + ["--name=late", "--timeout=60",
                         f"--deadline={time.time() - 1}", "--", py, "-c", ""])
  ok, fails, slow, late = _rows(rows)
  assert (ok["row"], ok["images_per_s"], ok["a"], ok["rc"]) == ("ok", 5.0, 7, 0)
  assert ok["env"] == {"A": "7"} and "error" not in ok
  assert fails["partial"] == 1 and fails["error"].startswith("rc 1: ")
  assert "boom" in fails["error"]
  assert slow["rc"] == "timeout" and slow["wall_s"] < 20
  assert late["error"].startswith("skipped")
  assert "noise" in open(log).read()


def test_trace_summary_of_a_chrome_trace(tmp_path):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1,
       "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2,
       "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
       "args": {"name": "Stream #7(compute)"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
       "args": {"name": "XLA Modules"}},
      {"ph": "X", "pid": 1, "tid": 7, "name": "cudnn-conv.1", "ts": 0,
       "dur": 600},
      {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "ts": 600,
       "dur": 300},
      {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "ts": 900,
       "dur": 100},
      # A module-level span over the same kernels: not counted again.
      {"ph": "X", "pid": 1, "tid": 8, "name": "jit_train_step", "ts": 0,
       "dur": 1000},
      {"ph": "X", "pid": 2, "name": "PjitFunction", "ts": 0, "dur": 5000},
  ]
  path = tmp_path / "plugins" / "profile" / "run"
  path.mkdir(parents=True)
  with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  out = tmp_path / "summary.json"
  assert trace_summary.main([str(tmp_path), str(out), "--steps=2"]) == 0
  s = json.loads(out.read_text())
  assert s["device_processes"] == ["/device:GPU:0"] and s["events"] == 3
  assert s["device_busy_ms_per_step"] == pytest.approx(0.5)
  assert s["by_kind"]["convolution"]["share"] == pytest.approx(0.6)
  assert s["by_kind"]["elementwise fusion"]["ms_per_step"] == pytest.approx(0.2)
  assert [o["name"] for o in s["top_ops"]] == ["cudnn-conv.1",
                                               "loop_add_fusion"]
  assert s["top_ops"][1]["calls_per_step"] == 1.0
  assert s["kernel_lines_only"]
  assert s["ms_per_step_by_line"] == {"Stream #7(compute)": 0.5,
                                      "XLA Modules": 0.5}
  assert trace_summary.main([str(tmp_path / "none"), str(out)]) == 1


def test_summarize_gpu_tables(tmp_path, capsys):
  def jax_row(name, ips, **kw):
    return dict(row=name, phase="step2", teacher=None, batch=256,
                dtype="bfloat16", images_per_s=ips, step_s_median=256 / ips,
                mfu=0.2, peak_memory_bytes=2**30, lower_s=1.0, compile_s=20.0,
                device="gpu:NVIDIA H200", **kw)

  rows = [
      jax_row("jax_step2_bf16", 6000.0),
      dict(framework="pytorch", config="reference", phase="step2",
           teacher=None, batch=256, dtype="float32", images_per_s=1000.0,
           step_s_median=0.256, mfu=0.1, peak_memory_bytes=2**31,
           first_step_s=3.0),
      dict(framework="pytorch", config="amp_channels_last_compile",
           phase="step2", teacher=None, batch=256, dtype="bfloat16",
           images_per_s=3000.0, step_s_median=256 / 3000, mfu=0.1,
           peak_memory_bytes=2**31, first_step_s=90.0),
      jax_row("lever_fp8", 7500.0,
              command="python -m bnn_jax.benchmark "
                      "--binary_conv_operand_dtype=float8_e4m3fn"),
      dict(row="lever_int8", phase="step2", error="rc 1: Unimplemented"),
  ]
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert summarize_gpu.main([str(path)]) == 0
  text = capsys.readouterr().out
  assert "| step2 | - | bnn_jax jax_step2_bf16 | bfloat16 |" in text
  assert "| 6,000 | 20.0% | 1,024 MiB | 1.0 + 20.0 s | 2.00x |" in text
  assert "PyTorch reference | float32 | 256.0 ms | 1,000 |" in text
  assert ("| lever_fp8 | `--binary_conv_operand_dtype=float8_e4m3fn` | 7,500 "
          "| 1.250x (6,000) |") in text
  assert "| lever_int8 | `` | failed: rc 1: Unimplemented |" in text
  path.write_text("{not json\n")
  assert summarize_gpu.main([str(path)]) == 1


@pytest.mark.slow
def test_torch_rows_on_the_cpu_without_tensorflow(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "rows.jsonl"
  code = ("import sys; sys.modules['tensorflow'] = None; "
          "from benchmarks import torch_side_by_side as t; "
          f"sys.exit(t.main(['--out={out}', '--phase=step1', "
          "'--teacher=resnet34', '--batch=2', '--input_size=32', "
          "'--steps=1', '--warmup=1', '--num_classes=10', "
          "'--configs=reference,amp_channels_last']))")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                 timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  reference, amp = _rows(out)
  assert (reference["config"], amp["config"]) == ("reference",
                                                  "amp_channels_last")
  for r in (reference, amp):
    assert "error" not in r and r["finite"] and r["images_per_s"] > 0
    assert r["teacher"] == "resnet34" and not r["tensorflow_imported"]
  assert (reference["dtype"], amp["dtype"]) == ("float32", "bfloat16")
  # Same FLOP count as bnn_jax.benchmark: reactnet_a step 1 + resnet34.
  assert reference["model_flops_per_step"] == amp["model_flops_per_step"] > 0


@pytest.mark.slow
def test_gpu_script_smoke_mode_end_to_end(tmp_path):
  """Three bnn_jax rows (two with a trace) and the tables, TensorFlow blocked."""
  env = dict(os.environ, BNN_GPU_SMOKE="1", PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", BNN_GPU_BUDGET_S="900",
             BNN_GPU_ROWS="^(jax_step2_bf16|lever_f16_chunked|"
                          "lever_bn_shifted_one_pass)$")
  subprocess.run(["bash", "benchmarks/gpu_side_by_side.sh", str(tmp_path)],
                 cwd=REPO, env=env, check=True, timeout=1000,
                 capture_output=True)
  rows = {r["row"]: r for r in _rows(tmp_path / "rows.jsonl")}
  assert sorted(rows) == ["jax_step2_bf16", "lever_bn_shifted_one_pass",
                          "lever_f16_chunked"]
  for r in rows.values():
    assert "error" not in r, r.get("error")
    assert r["images_per_s"] > 0 and r["dtype"] == "bfloat16"
  assert rows["lever_f16_chunked"]["model_overrides"] == {
      "binary_conv_impl": "float16_chunked"}
  assert rows["lever_bn_shifted_one_pass"]["model_overrides"] == {
      "bn_stats_method": "shifted_one_pass"}
  for name in ("jax_step2_bf16", "lever_f16_chunked"):
    assert rows[name]["trace_error"] is None
  for name in ("step2_bf16", "f16_chunked"):
    profile = json.loads((tmp_path / f"profile_{name}.json").read_text())
    assert profile["events"] > 0
  summary = (tmp_path / "summary.md").read_text()
  assert ("| lever_f16_chunked | `--binary_conv_impl=float16_chunked` |"
          in summary)
  assert ("| lever_bn_shifted_one_pass | "
          "`--bn_stats_method=shifted_one_pass` |" in summary)
  assert "### Profile: f16_chunked" in summary
  assert list((tmp_path / "xla_dump").glob("*train_step*.txt.gz"))


def test_cpu_ratio_table():
  from benchmarks import summarize_cpu  # pylint: disable=g-import-not-at-top
  rows = [{"row": "r1_32_reference", "images_per_s": 100.0},
          {"row": "r1_32_bnn_jax", "images_per_s": 250.0},
          {"row": "r2_32_reference", "images_per_s": 120.0},
          {"row": "r2_32_bnn_jax", "images_per_s": 240.0},
          {"row": "r2_224_bnn_jax", "error": "rc 1: boom"}]
  lines = summarize_cpu.ratio_table(rows)
  assert lines[2] == "| 32x32 | reference | 100.00 / 120.00 | 1.00x / 1.00x | 1.00x |"
  assert lines[3] == ("| 32x32 | bnn_jax | 250.00 / 240.00 | 2.50x / 2.00x | "
                      "2.25x |")
  assert len(lines) == 4
