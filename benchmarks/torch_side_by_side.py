"""PyTorch rows of the same-GPU comparison: the reference network, three ways.

  python benchmarks/torch_side_by_side.py --out=rows.jsonl \
      [--phase=step2|step1] [--teacher=resnet34] [--batch=256] \
      [--input_size=224] [--steps=10] [--warmup=3] \
      [--configs=reference,amp_channels_last,amp_channels_last_compile]

The student is `bnn_jax.interop.torch_reference.ReActNet` (ReActNet-A as the
AdamBNN reference computes it). One training step = forward, loss, backward,
Adam update:

* step2: binary activations and binary weights (the reference module as is),
  no teacher, cross-entropy, Adam without weight decay.
* step1: binary activations, real weights (every HardBinaryConv replaced by a
  plain conv of the same weight), Adam with L2 decay 5e-6; with `--teacher`
  the KD loss mean_i -sum_c softmax(t_i)_c log_softmax(s_i)_c from a frozen
  ResNet-34 (eval mode, no gradient; plain torch below, random weights, no
  download).

Configurations (each a JSON line appended to --out as soon as it is measured,
so a later failure or timeout keeps the earlier rows):

* reference: float32, NCHW, eager, torch.optim.Adam (foreach), the reference
  code's setting. torch's defaults apply: cuDNN convolutions may use TF32
  (`torch.backends.cudnn.allow_tf32`, True by default), matmuls do not.
  Every configuration sets `torch.backends.cudnn.benchmark = True` (as
  ImageNet training scripts do: the fastest algorithm per convolution,
  chosen during the warm-up steps).
* amp_channels_last: autocast to bfloat16, model and input channels_last,
  fused Adam; eager.
* amp_channels_last_compile: the same with `torch.compile` (default mode) of
  the student and the teacher: the strongest PyTorch configuration measured.
  The first step's wall time (compilation included) is reported as
  `first_step_s`.

Measured: the median step time of --steps steps after --warmup steps (each
synchronised), images/s, peak GPU memory (`torch.cuda.max_memory_allocated`
since the configuration started), MFU = model FLOPs / step time / peak, with
the FLOP count of `bnn_jax.benchmark.model_flops_per_step` (MACs of
`bnn_jax.summary` for the student and the teacher, the same count as the
bnn_jax rows) and the peak of `bnn_jax.benchmark.peak_flops` (bf16 dense for
the autocast rows, TF32 dense for float32). Imports no TensorFlow; JAX runs
on the CPU only, for the FLOP count.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from bnn_jax.interop import torch_reference

CONFIGS = ("reference", "amp_channels_last", "amp_channels_last_compile")


class RealWeightConv(nn.Module):
  """conv(x, W) with the parameter of a HardBinaryConv (AdamBNN step 1)."""

  def __init__(self, binary_conv: torch_reference.HardBinaryConv):
    super().__init__()
    self.stride, self.padding = binary_conv.stride, binary_conv.padding
    self.weight = binary_conv.weight

  def forward(self, x):
    return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)


def real_weights(module: nn.Module) -> nn.Module:
  """Replaces every HardBinaryConv under `module` by a RealWeightConv."""
  for name, child in module.named_children():
    if isinstance(child, torch_reference.HardBinaryConv):
      setattr(module, name, RealWeightConv(child))
    else:
      real_weights(child)
  return module


class ResNetBasicBlock(nn.Module):
  """relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x)) (torchvision)."""

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes, 1, stride, bias=False),
          nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class ResNet34(nn.Module):
  """torchvision's resnet34 layout (7x7/2 stem, maxpool, 3-4-6-3 blocks)."""

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    blocks, inplanes = [], 64
    for i, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
      for j in range(n):
        blocks.append(ResNetBasicBlock(inplanes, planes,
                                       2 if (i > 0 and j == 0) else 1))
        inplanes = planes
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    x = self.blocks(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@functools.lru_cache(maxsize=None)
def model_macs(phase: str, teacher: str, input_size: int,
               num_classes: int) -> tuple[int, int]:
  """(student MACs, teacher MACs) per example from `bnn_jax.summary`."""
  # JAX only counts here: on the CPU, so it takes no GPU memory from torch.
  os.environ["JAX_PLATFORMS"] = "cpu"
  from bnn_jax import models  # pylint: disable=g-import-not-at-top
  from bnn_jax import summary  # pylint: disable=g-import-not-at-top
  shape = (input_size, input_size, 3)
  s = summary.summarize(models.create(
      "reactnet_a", num_classes=num_classes,
      binary_weights=phase == "step2"), shape)
  t_macs = 0
  if teacher:
    t = summary.summarize(models.create(teacher, num_classes=num_classes),
                          shape)
    t_macs = t.bops + t.flops
  return s.bops + s.flops, t_macs


def _setting(read):
  """read(), or None where this torch version lacks what it reads."""
  try:
    return read()
  except Exception:  # pylint: disable=broad-except
    return None


def run_config(config: str, phase: str, teacher_name: str, batch: int,
               input_size: int, steps: int, warmup: int, num_classes: int,
               device: torch.device) -> dict:
  """Builds, warms up and times one configuration; returns its row."""
  torch.manual_seed(0)
  # cuDNN picks each convolution's fastest algorithm in the first (warm-up)
  # steps, as the reference training script sets it.
  torch.backends.cudnn.benchmark = True
  amp = config != "reference"
  channels_last = config != "reference"
  compiled = config.endswith("_compile")
  memory_format = (torch.channels_last if channels_last
                   else torch.contiguous_format)
  student = torch_reference.ReActNet(num_classes)
  if phase == "step1":
    student = real_weights(student)
  student = student.to(device, memory_format=memory_format).train()
  teacher = None
  if teacher_name:
    if teacher_name != "resnet34":
      raise ValueError(f"unknown teacher {teacher_name!r}; only resnet34")
    teacher = ResNet34(num_classes).to(
        device, memory_format=memory_format).eval()
    for p in teacher.parameters():
      p.requires_grad_(False)
  fused = amp and device.type == "cuda"
  optimizer = torch.optim.Adam(
      student.parameters(), lr=1.25e-3,
      weight_decay=5e-6 if phase == "step1" else 0.0,
      **({"fused": True} if fused else {}))
  student_fn, teacher_fn = student, teacher
  if compiled:
    student_fn = torch.compile(student)
    teacher_fn = None if teacher is None else torch.compile(teacher)
  images = torch.randn(batch, 3, input_size, input_size, device=device)
  images = images.contiguous(memory_format=memory_format)
  labels = torch.randint(0, num_classes, (batch,), device=device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      logits = student_fn(images)
      if teacher_fn is not None:
        with torch.no_grad():
          t = teacher_fn(images)
        loss = -(F.softmax(t.float(), dim=1)
                 * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
      else:
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    return loss

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  sync()
  start = time.perf_counter()
  loss = step()
  sync()
  first_step_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    loss = step()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - start)
  finite = bool(torch.isfinite(loss).item())
  median = statistics.median(times)
  student_macs, teacher_macs = model_macs(phase, teacher_name, input_size,
                                          num_classes)
  from bnn_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  flops = benchmark.model_flops_per_step(student_macs, teacher_macs, batch)
  device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else "cpu")
  dtype = "bfloat16" if amp else "float32"
  peak = (benchmark.peak_flops(device_name, dtype)
          if device.type == "cuda" else None)
  return {
      "framework": "pytorch", "torch": torch.__version__, "config": config,
      "model": "reactnet_a (torch_reference)", "phase": phase,
      "teacher": teacher_name or None, "batch": batch,
      "input_size": input_size, "dtype": dtype,
      "channels_last": channels_last, "compiled": compiled,
      "fused_adam": fused, "device": f"{device.type}:{device_name}",
      "cudnn_allow_tf32": _setting(lambda: torch.backends.cudnn.allow_tf32),
      "cudnn_benchmark": torch.backends.cudnn.benchmark,
      "matmul_allow_tf32": _setting(
          lambda: torch.backends.cuda.matmul.allow_tf32),
      "first_step_s": first_step_s, "step_s_median": median,
      "step_s_min": min(times), "step_s": times, "steps": steps,
      "warmup": warmup, "images_per_s": batch / median,
      "peak_memory_bytes": (int(torch.cuda.max_memory_allocated(device))
                            if device.type == "cuda" else None),
      "model_flops_per_step": flops, "peak_flops": peak,
      "mfu": None if peak is None else flops / median / peak,
      "finite": finite, "loss": float(loss.item()),
  }


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON lines file (appended)")
  parser.add_argument("--phase", choices=("step1", "step2"), default="step2")
  parser.add_argument("--teacher", default="")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--input_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  args = parser.parse_args(argv)
  configs = [c for c in args.configs.split(",") if c]
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    print(f"error: unknown --configs {unknown}; choose from {list(CONFIGS)}",
          file=sys.stderr)
    return 1
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  failures = 0
  for config in configs:
    try:
      row = run_config(config, args.phase, args.teacher, args.batch,
                       args.input_size, args.steps, args.warmup,
                       args.num_classes, device)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      failures += 1
      row = {"framework": "pytorch", "config": config, "phase": args.phase,
             "teacher": args.teacher or None, "batch": args.batch,
             "input_size": args.input_size,
             "error": f"{type(e).__name__}: {e}"[:500]}
    # (A None entry is a blocked import, not TensorFlow.)
    row["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row.get(k) for k in (
        "config", "phase", "teacher", "images_per_s", "mfu",
        "peak_memory_bytes", "first_step_s", "error")}), flush=True)
    # Free this configuration's models, compiled graphs and memory before
    # the next one measures its peak.
    _setting(torch._dynamo.reset)  # pylint: disable=protected-access
    gc.collect()
    if device.type == "cuda":
      torch.cuda.empty_cache()
  return 1 if failures == len(configs) else 0


if __name__ == "__main__":
  sys.exit(main())
