"""Convert Larq Zoo (Keras) weights into a bnn_jax checkpoint.

  python -m bnn_jax.import_larq --model=quicknet --weights=FILE.h5 \
      --out=/tmp/quicknet_imported

Reads a Larq Zoo model's `.h5` weights (what Keras 2 `model.save_weights`
or `model.save` writes; e.g. larq-zoo's `quicknet_weights.h5`), converts them
with `bnn_jax.interop.larq_import` (strict: a layer of another kind, a
weight name or shape that differs, or a different number of layers is an
error naming it) and writes `--out` with `checkpoint.save_variables`: a
directory that `init_from=` and `python -m bnn_jax.evaluate --checkpoint=`
accept. Its meta records the source file, the model and Larq's sign(0) = +1
(`model.zero_to`).

Exit status: 0 done; 1 bad input (one-line error; `--debug` shows the
traceback).
"""

from __future__ import annotations

import os

from absl import flags

from bnn_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("weights", None, "A Larq Zoo Keras .h5 weights file.")
  flags.DEFINE_string("model", None, "bnn_jax model name (quicknet_small, "
                      "quicknet, quicknet_large, birealnet18, "
                      "binary_resnet_e18).")
  flags.DEFINE_string("out", None, "Output checkpoint directory (must be "
                      "empty or absent).")
  flags.DEFINE_integer("input_size", 224, "Input height = width the model "
                       "was built for (binary_resnet_e18 has another stem "
                       "below 50).")
  flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")


def convert(weights: str, model_name: str, out: str,
            input_size: int = 224) -> dict:
  """Converts `weights` for `model_name`, saves it in `out`; returns meta."""
  from bnn_jax import checkpoint as checkpoint_lib
  from bnn_jax import models
  from bnn_jax.interop import larq_import

  models.create(model_name)  # an unknown name fails here, with the choices
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out {out} is not empty; pass a new directory")
  layers = larq_import.read_h5(weights)
  variables = larq_import.from_layers(layers, model_name, input_size)
  meta = {"phase": "import_larq",
          "model": {"name": model_name, "zero_to": larq_import.SIGN_ZERO},
          "source": os.path.abspath(weights),
          "num_classes": int(variables["params"]["fc"]["bias"].shape[0]),
          "input_size": input_size, "num_layers": len(layers)}
  checkpoint_lib.save_variables(out, variables, meta)
  return meta


def main(argv):
  del argv
  cli.quiet_logging()
  with cli.reporting_errors(debug=FLAGS.debug):
    if FLAGS.weights is None or FLAGS.out is None or FLAGS.model is None:
      raise ValueError("pass --model=NAME --weights=FILE.h5 --out=DIR")
    meta = convert(FLAGS.weights, FLAGS.model, FLAGS.out, FLAGS.input_size)
  print(f"imported {meta['num_layers']} layers of {FLAGS.weights} as "
        f"{FLAGS.model} ({meta['num_classes']} classes) into "
        f"{os.path.abspath(FLAGS.out)}", flush=True)


if __name__ == "__main__":
  cli.run_command(main, define_flags=define_flags)
