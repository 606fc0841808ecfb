"""ReActNet-A in PyTorch, as the AdamBNN reference computes it.

Written from docs/recipe.md (#architecture, #binarisation) with the
reference's module and parameter names, so
its `state_dict()` has the reference checkpoints' keys. Two uses:

* tests: imported variables must compute what these modules compute
  (`tests/test_torch_import.py`, run where torch is installed);
* `python -m bnn_jax.interop.torch_reference --batch=16 --input_size=224`
  times the reference's step-2 training step (forward, backward, Adam,
  cross-entropy) on this machine, the baseline of docs/performance.md.

Binarisers as in the reference (straight-through by the detach trick):
  activations: forward sign(x) (torch.sign: sign(0) = 0), gradient of the
    piecewise polynomial 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere;
  weights: forward alpha * sign(W), alpha = mean |W| per output channel
    (detached), gradient of clamp(W, -1, 1).

Needs torch (`pip install torch==2.13.0`), an optional dependency: import
this module only where torch is installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

REACTNET_A_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512,
                       512, 1024, 1024)


class LearnableBias(nn.Module):
  """x + b, b of shape (1, C, 1, 1), init 0."""

  def __init__(self, channels: int):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

  def forward(self, x):
    return x + self.bias


class BinaryActivation(nn.Module):
  """sign(x) forward; the polynomial ApproxSign gradient backward."""

  def forward(self, x):
    poly = torch.where(x < -1, -torch.ones_like(x),
                       torch.where(x < 0, x * x + 2 * x,
                                   torch.where(x < 1, -x * x + 2 * x,
                                               torch.ones_like(x))))
    return torch.sign(x).detach() - poly.detach() + poly


class HardBinaryConv(nn.Module):
  """conv(x, alpha * sign(W)) with clamp's straight-through gradient."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
               stride: int = 1):
    super().__init__()
    self.stride, self.padding = stride, kernel_size // 2
    self.weight = nn.Parameter(torch.rand(
        out_channels, in_channels, kernel_size, kernel_size) * 1e-3)

  def forward(self, x):
    w = self.weight
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    clipped = torch.clamp(w, -1.0, 1.0)
    binary = (alpha * torch.sign(w)).detach() - clipped.detach() + clipped
    return F.conv2d(x, binary, stride=self.stride, padding=self.padding)


class BasicBlock(nn.Module):
  """One ReActNet-A block (docs/recipe.md#reactnet-a), reference names."""

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.stride, self.same = stride, inplanes == planes
    self.move11 = LearnableBias(inplanes)
    self.binary_3x3 = HardBinaryConv(inplanes, inplanes, 3, stride)
    self.bn1 = nn.BatchNorm2d(inplanes)
    self.move12 = LearnableBias(inplanes)
    self.prelu1 = nn.PReLU(inplanes)
    self.move13 = LearnableBias(inplanes)
    self.move21 = LearnableBias(inplanes)
    if self.same:
      self.binary_pw = HardBinaryConv(inplanes, planes, 1)
      self.bn2 = nn.BatchNorm2d(planes)
    else:
      self.binary_pw_down1 = HardBinaryConv(inplanes, inplanes, 1)
      self.binary_pw_down2 = HardBinaryConv(inplanes, inplanes, 1)
      self.bn2_1 = nn.BatchNorm2d(inplanes)
      self.bn2_2 = nn.BatchNorm2d(inplanes)
    self.move22 = LearnableBias(planes)
    self.prelu2 = nn.PReLU(planes)
    self.move23 = LearnableBias(planes)
    self.binary_activation = BinaryActivation()

  def forward(self, x):
    out1 = self.bn1(self.binary_3x3(self.binary_activation(self.move11(x))))
    if self.stride == 2:
      x = F.avg_pool2d(x, 2, 2)
    out1 = self.move13(self.prelu1(self.move12(x + out1)))
    out2 = self.binary_activation(self.move21(out1))
    if self.same:
      out2 = self.bn2(self.binary_pw(out2)) + out1
    else:
      out2 = torch.cat([self.bn2_1(self.binary_pw_down1(out2)) + out1,
                        self.bn2_2(self.binary_pw_down2(out2)) + out1], dim=1)
    return self.move23(self.prelu2(self.move22(out2)))


class FirstConv(nn.Module):
  """Stem: conv 3x3 stride 2 (no bias) -> BN."""

  def __init__(self, in_channels: int, out_channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_channels)

  def forward(self, x):
    return self.bn1(self.conv1(x))


def reference_strides(channels: Sequence[int]) -> list[int]:
  """Block i has stride 2 when c[i-1] != c[i] and c[i] != 64, else 1."""
  return [2 if (c_in != c_out and c_out != 64) else 1
          for c_in, c_out in zip(channels[:-1], channels[1:])]


class ReActNet(nn.Module):
  """ReActNet-A: `feature` = [stem, 13 blocks], global pool, `fc`.

  `strides` defaults to the reference rule on `channels`; narrower copies
  pass the full-width model's strides.
  """

  def __init__(self, num_classes: int = 1000,
               channels: Sequence[int] = REACTNET_A_CHANNELS,
               strides: Optional[Sequence[int]] = None, in_channels: int = 3):
    super().__init__()
    strides = reference_strides(channels) if strides is None else strides
    self.feature = nn.ModuleList([FirstConv(in_channels, channels[0], 2)])
    for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides):
      self.feature.append(BasicBlock(c_in, c_out, stride))
    self.fc = nn.Linear(channels[-1], num_classes)

  def forward(self, x):
    for module in self.feature:
      x = module(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_train_step(batch: int, input_size: int,
                     num_classes: int = 1000) -> Callable[[], float]:
  """The step-2 training step on one fixed random batch, as a callable.

  Each call runs forward, cross-entropy, backward and Adam (the
  reference's optimizer and rate) and returns the loss.
  """
  model = ReActNet(num_classes).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1.25e-3)
  images = torch.randn(batch, 3, input_size, input_size)
  labels = torch.randint(0, num_classes, (batch,))

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())

  return step


def benchmark_train_step(batch: int, input_size: int, steps: int = 10,
                         warmup: int = 2, num_classes: int = 1000) -> dict:
  """Median time of the step-2 training step: forward, CE, backward, Adam.

  Also the process's peak resident memory (`ru_maxrss`, Linux).
  """
  step = build_train_step(batch, input_size, num_classes)
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {"framework": f"torch {torch.__version__}",
          "threads": torch.get_num_threads(), "batch": batch,
          "input_size": input_size, "step_s_median": median,
          "step_s_min": min(times), "images_per_s": batch / median,
          "max_rss_bytes": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--input_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num_classes", type=int, default=1000)
  args = parser.parse_args()
  result = benchmark_train_step(args.batch, args.input_size, args.steps,
                                args.warmup, args.num_classes)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
