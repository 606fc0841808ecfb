"""Convert a reference PyTorch checkpoint into a bnn_jax checkpoint.

  python -m bnn_jax.import_torch --checkpoint=model_best.pth.tar \
      --model=reactnet_a --out=/tmp/reactnet_a_imported [--num_classes=1000]

Reads an AdamBNN / ReActNet-A or torchvision ResNet checkpoint (`.pth`,
`.pth.tar`: needs torch; or a `.npz` of its state dict), converts it with
`bnn_jax.interop.torch_import` (strict: any missing, unexpected or
mis-shaped key is an error naming it) and writes `--out` with
`checkpoint.save_variables`: a directory that `init_from=` and
`python -m bnn_jax.evaluate --checkpoint=` accept. Its meta records the
source file, the model, the reference's sign(0) = 0 (`model.zero_to`, which
evaluation and export then use) and the checkpoint's scalar entries (epoch,
best_top1_acc).

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
  flags.DEFINE_string("checkpoint", None,
                      "A .pth/.pth.tar (torch) or .npz file.")
  flags.DEFINE_string("model", "reactnet_a", "bnn_jax model name.")
  flags.DEFINE_string("out", None, "Output checkpoint directory (must be "
                      "empty or absent).")
  flags.DEFINE_integer("num_classes", None, "Classes of the classifier; "
                       "default: the rows of the checkpoint's fc.weight.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")


def convert(checkpoint: str, model_name: str, out: str,
            num_classes: int | None = None) -> dict:
  """Converts `checkpoint` for `model_name`, saves it in `out`; returns meta."""
  from bnn_jax import checkpoint as checkpoint_lib
  from bnn_jax.interop import torch_import

  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out {out} is not empty; pass a new directory")
  state_dict, extras = torch_import.read_checkpoint(checkpoint)
  kwargs = {} if num_classes is None else {"num_classes": num_classes}
  variables = torch_import.from_state_dict(state_dict, model_name, **kwargs)
  meta = {"phase": "import_torch",
          "model": {"name": model_name, "zero_to": torch_import.SIGN_ZERO},
          "source": os.path.abspath(checkpoint),
          "num_classes": int(variables["params"]["fc"]["bias"].shape[0]),
          "num_tensors": len(state_dict), **extras}
  checkpoint_lib.save_variables(out, variables, meta)
  return meta


def main(argv):
  del argv
  cli.quiet_logging()
  with cli.reporting_errors(debug=FLAGS.debug):
    if FLAGS.checkpoint is None or FLAGS.out is None:
      raise ValueError("pass --checkpoint=FILE and --out=DIR")
    meta = convert(FLAGS.checkpoint, FLAGS.model, FLAGS.out, FLAGS.num_classes)
  print(f"imported {meta['num_tensors']} tensors of {FLAGS.checkpoint} as "
        f"{FLAGS.model} ({meta['num_classes']} classes) into "
        f"{os.path.abspath(FLAGS.out)}", flush=True)


if __name__ == "__main__":
  cli.run_command(main, define_flags=define_flags)
