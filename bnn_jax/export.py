"""Export a trained binary network for deployment.

  python -m bnn_jax.export --config=configs/digits.py \
      --checkpoint=/tmp/bnn_digits/step2 [--phase=step2] \
      --format=packed --out=/tmp/digits_step2.bnn.npz [--json]
  python -m bnn_jax.export ... --format=lce --out=/tmp/digits_step2.tflite \
      [--lce_python=/work/venvs/lce/bin/python]

Loads the phase's model and checkpoint as `bnn_jax.evaluate` does (the same
loader: strict variable check, sign(0) from the checkpoint's meta) and
writes:

* `--format=packed`: one `.npz` with a JSON header (`bnn_jax.packed`): each
  binary conv kernel as sign bits, 32 input channels to a uint32 word, with
  its per-output-channel scale; BatchNorms folded into y = x * m + o; every
  other layer's float32 parameters as they are; the metadata that rebuilds
  the forward (model name and attributes, sign(0) conventions, input size
  and normalisation, format version). About 1/20 of the float checkpoint.
  `python -m bnn_jax.evaluate --config=FILE --packed=PATH` evaluates it.
* `--format=lce`: a TensorFlow Lite flatbuffer with Larq Compute Engine's
  binary ops (LceQuantize, LceBconv2d), made in the environment of
  `tools/make_lce_env.sh` (`bnn_jax.export_lce`) from the packed file, and
  checked there against this packed forward with LCE's interpreter.

Only a phase whose binary convs have binary weights and binary inputs can
be exported (AdamBNN step 2); any other phase is refused by name. Exact-zero
weights (a checkpoint imported from torch, whose sign(0) = 0, can hold
some) are stored as +1 and counted in the header and in the output.

Exit status: 0 done; 1 bad input (one-line error; `--debug` shows the
traceback). An existing `--out` is never overwritten.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

from absl import flags
from ml_collections import config_flags

from bnn_jax import cli

FLAGS = flags.FLAGS
FORMATS = ("packed", "lce")
DEFAULT_LCE_PYTHON = "/work/venvs/lce/bin/python"


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file (configs/*.py).",
      lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory to export.")
  flags.DEFINE_string("phase", None, "Phase whose model to build; default: "
                      "the last of config.phase_order.")
  flags.DEFINE_enum("format", "packed", list(FORMATS),
                    "packed: 1-bit .npz (bnn_jax.packed); lce: .tflite with "
                    "Larq Compute Engine binary ops.")
  flags.DEFINE_string("out", None, "Output file (must not exist).")
  flags.DEFINE_string("lce_python", DEFAULT_LCE_PYTHON,
                      "--format=lce: the Python of the LCE environment "
                      "(bash tools/make_lce_env.sh).")
  flags.DEFINE_integer("lce_check_examples", 64, "--format=lce: random "
                       "inputs on which LCE's interpreter is compared with "
                       "the packed forward.")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")


def check_exportable(model: Any, phase: str, input_shape: tuple[int, ...]
                     ) -> None:
  """ValueError naming `phase` unless its binary convs are binary in and out."""
  from bnn_jax import packed
  from bnn_jax.layers import BinaryConv

  convs = [c.module for c in packed.trace_layers(model, input_shape)
           if isinstance(c.module, BinaryConv)]
  binary_inputs = [c for c in convs if c.binary_inputs]
  if not binary_inputs:
    raise ValueError(f"phase {phase!r} ({type(model).__name__}) has no binary "
                     "convolution; export a binary phase, e.g. --phase=step2")
  real_weights = [c for c in binary_inputs if not c.binary_weights]
  if real_weights:
    raise ValueError(f"phase {phase!r} has real-valued weights (model "
                     "binary_weights=False): the packed format stores binary "
                     "kernels; export a phase with binary weights, e.g. "
                     "--phase=step2")
  if any(c.binary_weights and not c.binary_inputs for c in convs):
    raise ValueError(f"phase {phase!r} has binary weights on real-valued "
                     "inputs (binary_activations=False); the packed format "
                     "needs binary activations")
  zero_to = float(model.zero_to)
  if zero_to not in packed.SIGN_ZERO_VALUES:
    raise ValueError(f"phase {phase!r} has sign(0) = {zero_to}; a binary "
                     f"network has sign(0) in {packed.SIGN_ZERO_VALUES}")


def build_packed(config, checkpoint: str, phase: str | None = None
                 ) -> tuple[dict, dict, dict]:
  """(header, packed variables, loaded phase) of a checkpoint.

  `loaded` is `evaluation.load_phase`'s dict (model, float variables, ...).
  """
  from bnn_jax.training import evaluation
  from bnn_jax import models
  from bnn_jax import packed
  from bnn_jax.training import preprocess

  loaded = evaluation.load_phase(config, checkpoint, phase)
  model, info = loaded["model"], loaded["info"]
  input_shape = tuple(int(d) for d in info.image_shape)
  check_exportable(model, loaded["phase"], input_shape)
  result = packed.pack_variables(model, loaded["variables"], input_shape)
  name = loaded["model_cfg"]["name"]
  overrides = {k: v for k, v in loaded["model_cfg"].items()
               if k != "name" and k in models.model_fields(name)
               and k not in ("num_classes", "dtype", "bn_group_size")}
  overrides = {k: list(v) if isinstance(v, tuple) else v
               for k, v in overrides.items()}
  recipe = preprocess.get_recipe(config.dataset.name)
  float_bytes = packed.variables_bytes(loaded["variables"]["params"])
  header = {
      "model": {"name": name, "num_classes": int(info.num_classes),
                "overrides": overrides},
      "sign_zero": {
          "activations": float(model.zero_to),
          "weights_in_checkpoint": float(model.zero_to),
          "zero_weights_stored_as": packed.ZERO_WEIGHTS_TO,
          "zero_weights": result.zero_weights},
      "input": {"dataset": config.dataset.name, "shape": list(input_shape),
                "layout": "NHWC", "mean": [float(m) for m in recipe.mean],
                "std": [float(s) for s in recipe.std],
                "normalisation": "(pixel / 255 - mean) / std per channel"},
      "bits": {"word": "uint32", "order": "channel c is bit c % 32 of word "
               "c // 32", "one": "+1", "zero": "-1"},
      "binary_convs": result.binary_convs,
      "real_convs": result.real_convs,
      "source": {"checkpoint": os.path.abspath(checkpoint),
                 "phase": loaded["phase"],
                 "float_params_bytes": float_bytes,
                 "float_batch_stats_bytes": packed.variables_bytes(
                     loaded["variables"].get("batch_stats", {}))},
  }
  return header, result.variables, loaded


def export_packed(config, checkpoint: str, out: str,
                  phase: str | None = None) -> dict:
  """Writes the packed file `out`; returns a summary of what it holds."""
  from bnn_jax import packed

  _refuse_existing(out)
  header, variables, _ = build_packed(config, checkpoint, phase)
  size = packed.write(out, header, variables)
  return _summary(header, out, size)


def _summary(header: dict, out: str, size: int) -> dict:
  float_bytes = header["source"]["float_params_bytes"]
  return {"format": "packed", "out": os.path.abspath(out), "bytes": size,
          "float_params_bytes": float_bytes,
          "compression": float_bytes / size,
          "binary_convs": len(header["binary_convs"]),
          "zero_weights": header["sign_zero"]["zero_weights"],
          "phase": header["source"]["phase"],
          "model": header["model"]["name"]}


def _refuse_existing(out: str) -> None:
  if os.path.exists(out):
    raise ValueError(f"--out {out} exists; pass a new path (an export never "
                     "overwrites)")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ValueError(f"the directory of --out {out} does not exist; create "
                     f"{parent} first")


def export_lce(config, checkpoint: str, out: str, phase: str | None = None,
               lce_python: str = DEFAULT_LCE_PYTHON,
               check_examples: int = 64) -> dict:
  """Writes a .tflite with LCE binary ops and checks it with LCE's interpreter.

  The packed file and the packed forward's logits on `check_examples`
  random normal inputs are written to a temporary directory; `lce_python
  -m bnn_jax.deploy.export_lce` builds the Larq model from them, converts
  it and compares the interpreter's logits and predictions.
  """
  _refuse_existing(out)
  if not os.path.isfile(lce_python):
    raise ValueError(f"--lce_python {lce_python} does not exist; make the "
                     "LCE environment with bash tools/make_lce_env.sh")
  header, variables, _ = build_packed(config, checkpoint, phase)
  return convert_packed_to_lce(header, variables, out, lce_python,
                               check_examples)


def convert_packed_to_lce(header: dict, variables: dict, out: str,
                          lce_python: str = DEFAULT_LCE_PYTHON,
                          check_examples: int = 64) -> dict:
  """`export_lce` from a packed header and variables (`build_packed`'s).

  The ReActNet-A family goes through `bnn_jax.export_lce`, the Larq Zoo
  models (`bnn_jax.interop.larq_import.supported_models()`) through
  `bnn_jax.export_lce_zoo`, which builds Larq Zoo's own Keras model and is
  given the Keras layers in bnn_jax's call order.
  """
  import jax
  import numpy as np

  from bnn_jax import packed
  from bnn_jax.interop import larq_import

  name = header["model"]["name"]
  if name in larq_import.supported_models():
    _check_larq_zoo_layout(name, header["model"]["overrides"])
  shape = tuple(header["input"]["shape"])
  images = np.asarray(jax.random.normal(
      jax.random.key(0), (check_examples,) + shape), np.float32)
  packed_model = packed.PackedModel(header)
  logits = np.asarray(jax.jit(packed_model.apply)(variables, images))
  with tempfile.TemporaryDirectory() as tmp:
    packed_path = os.path.join(tmp, "model.bnn.npz")
    packed.write(packed_path, header, variables)
    check_path = os.path.join(tmp, "check.npz")
    np.savez(check_path, images=images, logits=logits)
    command = [lce_python, "-m", "bnn_jax.deploy.export_lce",
               f"--packed={packed_path}", f"--out={out}",
               f"--check={check_path}"]
    if name in larq_import.supported_models():
      layers_path = os.path.join(tmp, "layers.json")
      with open(layers_path, "w") as f:
        json.dump([{"kind": l.kind, "keras_name": l.keras_name,
                    "path": list(l.path)}
                   for l in larq_import.expected_layers(
                       name, shape[0], int(header["model"]["num_classes"]))],
                  f)
      command[2] = "bnn_jax.deploy.export_lce_zoo"
      command.append(f"--layers={layers_path}")
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        command, capture_output=True, text=True, cwd=src,
        env=dict(os.environ, PYTHONPATH=src, TF_CPP_MIN_LOG_LEVEL="3"))
  if proc.returncode != 0:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    raise RuntimeError(f"the LCE conversion failed: "
                       f"{lines[-1] if lines else proc.returncode}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_larq_zoo_layout(name: str, overrides: dict) -> None:
  """ValueError unless the overrides keep Larq Zoo's layout of `name`.

  The LCE export of a Larq Zoo model builds Larq Zoo's own Keras model;
  attributes that change its layers (e.g. QuickNet's section_filters) have
  no Larq Zoo equivalent. sign(0) and binary_* flags are checked elsewhere.
  """
  from bnn_jax import models
  from bnn_jax import packed

  defaults = models.default_attributes(name)
  changed = {k: v for k, v in packed.model_overrides(overrides).items()
             if k in defaults and v != defaults[k]
             and k not in ("zero_to", "binary_weights", "binary_activations")}
  if changed:
    raise ValueError(f"the LCE export builds Larq Zoo's own {name}; the "
                     f"model attributes {changed} have no Larq Zoo "
                     "equivalent: use --format=packed")


def format_line(r: dict) -> str:
  """One human-readable line of an export's result."""
  if r["format"] == "packed":
    return (f"{r['phase']} ({r['model']}) -> {r['out']}: {r['bytes']} bytes, "
            f"{r['compression']:.1f}x smaller than the float32 params "
            f"({r['float_params_bytes']} bytes); {r['binary_convs']} binary "
            f"convs, {r['zero_weights']} exact-zero weights stored as +1")
  return (f"lce -> {r['out']}: {r['bytes']} bytes, ops {r['ops']}; "
          f"interpreter vs packed forward on {r['examples']} inputs: "
          f"predictions equal {r['predictions_equal']}, max |logit diff| "
          f"{r['max_abs_logit_diff']:.3g}")


def main(argv):
  del argv
  with cli.reporting_errors(debug=FLAGS.debug):
    if FLAGS.config is None or FLAGS.checkpoint is None or FLAGS.out is None:
      raise ValueError("pass --config=configs/<name>.py, --checkpoint=<dir> "
                       "and --out=<file>")
    if FLAGS.format == "packed":
      result = export_packed(FLAGS.config, FLAGS.checkpoint, FLAGS.out,
                             FLAGS.phase)
    else:
      result = export_lce(FLAGS.config, FLAGS.checkpoint, FLAGS.out,
                          FLAGS.phase, FLAGS.lce_python,
                          FLAGS.lce_check_examples)
  print(json.dumps(result) if FLAGS.json else format_line(result), flush=True)


if __name__ == "__main__":
  cli.run_command(main, define_flags=define_flags)
