"""What logging the weight dynamics costs, amortised over training steps.

  python -m bnn_jax.dynamics_benchmark [--model=reactnet_small] [--batch=64] \
      [--input_size=8] [--teacher=resnet_small] [--every=25] [--blocks=6]

Runs the training loop's two variants on the same state and batch: the
jitted train step alone, and the train step followed by
`DynamicsMonitor.after_step` (an extra forward and backward pass, the
metrics fetched to the host and written to TensorBoard + metrics.jsonl
every `--every` steps, the signs kept one step before). Blocks of
`--every` steps alternate between the two, `--blocks` times each, after a
warm-up that compiles everything; each block is timed to
`jax.block_until_ready`. Reported: the median time per step of each
variant and the overhead = (with - without) / without, so slow-downs from
other processes on a shared machine hit both alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from absl import flags
from absl import logging
import jax
import ml_collections

from bnn_jax import config_lib
from bnn_jax import dynamics
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import train_step
from bnn_jax.training import logs

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("model", "reactnet_small", "Student (binary weights).")
  flags.DEFINE_integer("batch", 64, "Global batch size.")
  flags.DEFINE_integer("input_size", 8, "Input height and width.")
  flags.DEFINE_integer("channels", 1, "Input channels.")
  flags.DEFINE_integer("num_classes", 10, "Classes.")
  flags.DEFINE_string("teacher", "resnet_small",
                      "Teacher model for KD ('' = none, CE loss).")
  flags.DEFINE_integer("every", 25, "config.dynamics.every.")
  flags.DEFINE_integer("blocks", 6, "Timed blocks of `every` steps per variant.")
  flags.DEFINE_bool("per_layer", True, "config.dynamics.per_layer.")


def measure(model_name: str, batch: int, input_size: int, channels: int,
            num_classes: int, teacher: str, every: int, blocks: int,
            per_layer: bool = True) -> dict:
  """Median seconds per step without and with the dynamics hook."""
  shape = (batch, input_size, input_size, channels)
  image = jax.random.normal(jax.random.key(1), shape)
  data = {"image": image,
          "label": jax.random.randint(jax.random.key(2), (batch,), 0,
                                      num_classes)}
  model = models.create(model_name, num_classes=num_classes)
  tx = optim.build_optimizer({"name": "adam"}, steps_per_epoch=1000,
                             num_epochs=10)
  loss_cfg = ml_collections.ConfigDict(
      {"kd_weight": 1.0, "ce_weight": 0.0} if teacher else
      {"kd_weight": 0.0, "ce_weight": 1.0})
  teacher_model, teacher_vars = None, {}
  if teacher:
    teacher_model = models.create(teacher, num_classes=num_classes)
    teacher_vars = teacher_model.init(jax.random.key(3), image[:1],
                                      train=False)
  step_fn = jax.jit(
      train_step.make_train_step(model, tx, loss_cfg, teacher_model),
      donate_argnums=(0,))
  state = train_step.init_state(model, tx, jax.random.key(0), image.shape[1:])
  config = config_lib.base_config("digits")
  config.dynamics.every = every
  config.dynamics.per_layer = per_layer
  config.phase_order = "bench"
  config.phases.bench = config_lib.phase_config(model_name, 1)
  config.phases.bench.loss = loss_cfg
  workdir = tempfile.mkdtemp(prefix="dynamics_benchmark_")
  monitor = dynamics.DynamicsMonitor.create(
      config, "bench", 0, workdir, model=model, teacher_model=teacher_model,
      state=state, step=0,
      replicated=jax.sharding.SingleDeviceSharding(jax.devices()[0]),
      writer=logs.create_writer(workdir, "bench"))
  step = 0

  def run_block(with_dynamics: bool) -> float:
    nonlocal state, step
    start = time.perf_counter()
    for _ in range(every):
      state, metrics = step_fn(state, data, teacher_vars)
      step += 1
      if with_dynamics:
        monitor.after_step(step, state, data, teacher_vars)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / every

  run_block(True)  # compiles the train step, the dynamics step, the signs
  run_block(False)
  times = {False: [], True: []}
  for _ in range(blocks):
    for variant in (False, True):
      times[variant].append(run_block(variant))
  without = statistics.median(times[False])
  with_ = statistics.median(times[True])
  return {"model": model_name, "batch": batch, "input_size": input_size,
          "teacher": teacher, "every": every, "per_layer": per_layer,
          "blocks": blocks,
          "device": jax.devices()[0].device_kind,
          "step_s": round(without, 5), "step_with_dynamics_s": round(with_, 5),
          "overhead": round((with_ - without) / without, 4)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the writer logs every scalar
  print(json.dumps(measure(FLAGS.model, FLAGS.batch, FLAGS.input_size,
                           FLAGS.channels, FLAGS.num_classes, FLAGS.teacher,
                           FLAGS.every, FLAGS.blocks, FLAGS.per_layer)))


