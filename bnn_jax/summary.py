"""Cost summary of a model: parameters by precision, memory, BOPs, FLOPs, OPs.

Everything is derived from the model itself: `model.init` is traced under
`jax.eval_shape` (no compute, no parameter memory) with
`flax.linen.intercept_methods` recording every module call, its path and its
output shape; parameter counts come from the traced parameter tree. Nothing is
read from hand-typed tables.

Counting rules (per example, i.e. batch 1, as in the papers):

* MACs of a convolution or dense layer with kernel K (HWIO or IO) and output
  O (N, ..., C_out):  MACs = prod(O.shape[1:-1]) * K.size,
  i.e. out_H * out_W * C_out * k * k * C_in for a conv (C_in per group for a
  grouped `nn.Conv`) and C_in * C_out for a dense layer.
* BOPs  = MACs of every `BinaryConv` whose inputs *and* weights are binary
  (`binary_inputs and binary_weights`): XNOR + popcount operations.
* FLOPs = MACs of every other conv / dense layer (real stem, real shortcut
  convs, the classifier, and step-1 convs with real weights). BatchNorm,
  shifts, PReLU, pooling and additions are not counted, as in the papers.
* OPs   = BOPs / 64 + FLOPs (a 64-bit CPU does 64 binary ops per
  instruction; Bi-Real Net / ReActNet convention).
* Parameters: trainable parameters only (the `params` collection; BatchNorm
  running statistics are excluded). Binary parameters are the kernels of
  `BinaryConv` layers with binary weights; every other parameter is real.
* Memory = 1 bit per binary parameter + 32 bits per real parameter;
  memory_bytes = ceil(memory_bits / 8).

Python:

  from bnn_jax import models, summary
  s = summary.summarize(models.create("reactnet_a"), (224, 224, 3))
  s.ops, s.binary_params
  print(s.table())

Command line:

  python -m bnn_jax.summary --model=reactnet_a [--input_size=224]
      [--num_classes=1000] [--input_channels=3] [--depth=1] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import models
from bnn_jax.layers import BinaryConv

BOPS_PER_OP = 64
REAL_BITS = 32
BINARY_BITS = 1

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """The cost of one module call (or of a group of calls under one path).

  Attributes:
    path: module path, '/'-joined (e.g. "block_3/binary_3x3").
    kind: class name; conv/dense layers add kernel size, stride and bit
      widths, e.g. "BinaryConv 3x3/2 W1A1" (W = weight bits, A = input bits).
    output_shape: output shape of one example (batch dimension dropped), or
      None when the module does not return a single array.
    binary_params: 1-bit parameters owned by the layer.
    real_params: 32-bit parameters owned by the layer.
    bops: binary MACs.
    flops: real MACs.
  """
  path: str
  kind: str
  output_shape: Optional[tuple[int, ...]]
  binary_params: int
  real_params: int
  bops: int
  flops: int

  @property
  def params(self) -> int:
    return self.binary_params + self.real_params

  @property
  def memory_bits(self) -> int:
    """binary_params * 1 + real_params * 32."""
    return self.binary_params * BINARY_BITS + self.real_params * REAL_BITS

  @property
  def ops(self) -> float:
    """BOPs / 64 + FLOPs."""
    return self.bops / BOPS_PER_OP + self.flops


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer costs of a model and their totals (see the module docstring).

  Attributes:
    model: the model's class name.
    input_shape: the shape of one input example (H, W, C).
    layers: one row per module call that owns parameters or does MACs, in
      call order (or per group of them, see `summarize(depth=...)`). The rows
      sum to the totals.
  """
  model: str
  input_shape: tuple[int, ...]
  layers: tuple[LayerCost, ...]

  @property
  def binary_params(self) -> int:
    return sum(l.binary_params for l in self.layers)

  @property
  def real_params(self) -> int:
    return sum(l.real_params for l in self.layers)

  @property
  def params(self) -> int:
    return self.binary_params + self.real_params

  @property
  def memory_bits(self) -> int:
    """binary_params * 1 + real_params * 32."""
    return sum(l.memory_bits for l in self.layers)

  @property
  def memory_bytes(self) -> int:
    """ceil(memory_bits / 8)."""
    return -(-self.memory_bits // 8)

  @property
  def bops(self) -> int:
    return sum(l.bops for l in self.layers)

  @property
  def flops(self) -> int:
    return sum(l.flops for l in self.layers)

  @property
  def ops(self) -> float:
    """BOPs / 64 + FLOPs."""
    return self.bops / BOPS_PER_OP + self.flops

  def to_dict(self) -> dict[str, Any]:
    """Totals and per-layer rows as plain JSON-serialisable values."""
    return {
        "model": self.model,
        "input_shape": list(self.input_shape),
        "params": self.params,
        "binary_params": self.binary_params,
        "real_params": self.real_params,
        "memory_bits": self.memory_bits,
        "memory_bytes": self.memory_bytes,
        "bops": self.bops,
        "flops": self.flops,
        "ops": self.ops,
        "layers": [
            dict(dataclasses.asdict(l),
                 output_shape=(None if l.output_shape is None
                               else list(l.output_shape)))
            for l in self.layers
        ],
    }

  def one_line(self) -> str:
    """E.g. 'params 29,343,592 (1-bit 28,253,184, ...) | ... | OPs 8.71e7'."""
    return (f"params {self.params:,} (1-bit {self.binary_params:,}, 32-bit "
            f"{self.real_params:,}) | "
            f"memory {self.memory_bytes / 1e6:.2f} MB | "
            f"BOPs {_sci(self.bops)} | FLOPs {_sci(self.flops)} | "
            f"OPs {_sci(self.ops)}")

  def table(self) -> str:
    """An aligned text table: one row per layer, then totals and `one_line`."""
    header = ("layer", "kind", "output", "1-bit params", "32-bit params",
              "BOPs", "FLOPs")
    rows = [(l.path, l.kind, _format_shape(l.output_shape),
             f"{l.binary_params:,}", f"{l.real_params:,}", f"{l.bops:,}",
             f"{l.flops:,}") for l in self.layers]
    total = ("total", "", "", f"{self.binary_params:,}",
             f"{self.real_params:,}", f"{self.bops:,}", f"{self.flops:,}")
    widths = [max(len(r[i]) for r in [header, *rows, total])
              for i in range(len(header))]

    def fmt(row):
      left = [c.ljust(w) for c, w in zip(row[:3], widths[:3])]
      right = [c.rjust(w) for c, w in zip(row[3:], widths[3:])]
      return "  ".join(left + right).rstrip()

    rule = "-" * len(fmt(header))
    title = (f"{self.model}, input "
             f"{_format_shape(self.input_shape)} (one example)")
    return "\n".join([title, fmt(header), rule, *map(fmt, rows), rule,
                      fmt(total), self.one_line()])


def _sci(x: float) -> str:
  """Three significant digits in the papers' style: 87126016 -> '8.71e7'."""
  mantissa, exponent = f"{x:.2e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _format_shape(shape: Optional[Sequence[int]]) -> str:
  return "-" if shape is None else "x".join(map(str, shape))


def _per_example(shape: Optional[tuple[int, ...]]
                 ) -> Optional[tuple[int, ...]]:
  """Drops the batch dimension of an output shape."""
  return None if shape is None else shape[1:]


def _macs(output_shape: Sequence[int], kernel_shape: Sequence[int]) -> int:
  """MACs of one example: prod(output spatial dims) * kernel size."""
  return math.prod(output_shape[1:-1]) * math.prod(kernel_shape)


def _kind(module: nn.Module, kernel_shape: Sequence[int]) -> str:
  """Class name, plus kernel/stride and W<bits>A<bits> for conv/dense layers."""
  name = type(module).__name__
  if isinstance(module, BinaryConv):
    w = BINARY_BITS if module.binary_weights else REAL_BITS
    a = BINARY_BITS if module.binary_inputs else REAL_BITS
    k = module.kernel_size
    return f"{name} {k}x{k}/{module.strides} W{w}A{a}"
  if isinstance(module, nn.Conv):
    window = "x".join(map(str, kernel_shape[:-2]))
    return f"{name} {window} W{REAL_BITS}A{REAL_BITS}"
  if isinstance(module, nn.Dense):
    return f"{name} W{REAL_BITS}A{REAL_BITS}"
  return name


@dataclasses.dataclass
class _Call:
  """One intercepted `__call__`: the module, its path and its output shape."""
  path: Path
  module: nn.Module
  output_shape: Optional[tuple[int, ...]] = None


def _trace_calls(model: nn.Module, input_shape: Sequence[int], dtype: Any
                 ) -> tuple[list[_Call], Any]:
  """Calls of `model.init` on one example (pre-order) and the params shapes."""
  calls: list[_Call] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    call = _Call(tuple(context.module.path), context.module)
    calls.append(call)  # before next_fun: parents precede their children
    out = next_fun(*args, **kwargs)
    if hasattr(out, "shape"):
      call.output_shape = tuple(int(d) for d in out.shape)
    return out

  example = jax.ShapeDtypeStruct((1, *input_shape), dtype)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), example)
  return calls, variables["params"]


def _own_params(params: Any) -> dict[Path, dict[str, tuple[int, ...]]]:
  """{module path: {param name: shape}} from a (shape-only) params tree."""
  owned: dict[Path, dict[str, tuple[int, ...]]] = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(k.key for k in key_path)
    owned.setdefault(names[:-1], {})[names[-1]] = tuple(leaf.shape)
  return owned


def _layer_cost(call: _Call, own: dict[str, tuple[int, ...]],
                count_params: bool) -> LayerCost:
  """Costs of one call; its parameters only when `count_params`."""
  sizes = {n: math.prod(s) for n, s in own.items()} if count_params else {}
  binary_params = bops = flops = 0
  kind = type(call.module).__name__
  if isinstance(call.module, (BinaryConv, nn.Conv, nn.Dense)):
    kernel_shape = own["kernel"]
    kind = _kind(call.module, kernel_shape)
    macs = _macs(call.output_shape, kernel_shape)
    binary = isinstance(call.module, BinaryConv) and call.module.binary_weights
    if binary and call.module.binary_inputs:
      bops = macs
    else:
      flops = macs
    if binary:
      binary_params = sizes.get("kernel", 0)
  return LayerCost(
      path="/".join(call.path), kind=kind,
      output_shape=_per_example(call.output_shape),
      binary_params=binary_params,
      real_params=sum(sizes.values()) - binary_params, bops=bops, flops=flops)


def _group(calls: list[_Call], layers: list[LayerCost], depth: int
           ) -> list[LayerCost]:
  """Sums the rows under each path prefix of length `depth` into one row."""
  first_call = {}
  for call in calls:
    first_call.setdefault(call.path, call)
  groups: dict[str, list[LayerCost]] = {}
  for layer in layers:
    prefix = "/".join(layer.path.split("/")[:depth])
    groups.setdefault(prefix, []).append(layer)
  grouped = []
  for prefix, members in groups.items():
    if len(members) == 1 and members[0].path == prefix:
      grouped.append(members[0])
      continue
    call = first_call[tuple(prefix.split("/"))]
    grouped.append(LayerCost(
        path=prefix, kind=type(call.module).__name__,
        output_shape=_per_example(call.output_shape),
        binary_params=sum(m.binary_params for m in members),
        real_params=sum(m.real_params for m in members),
        bops=sum(m.bops for m in members),
        flops=sum(m.flops for m in members)))
  return grouped


def summarize(model: nn.Module, input_shape: Sequence[int],
              dtype: Any = jnp.float32, depth: Optional[int] = None
              ) -> Summary:
  """Traces `model` on one example of `input_shape` and counts its costs.

  Args:
    model: a linen Module called as `model(x, train=bool)` (the registry's
      contract), with `BinaryConv`, `nn.Conv` and `nn.Dense` as its MAC layers.
    input_shape: the shape of one example, e.g. (224, 224, 3).
    dtype: the input dtype.
    depth: None for one row per module call that owns parameters or does
      MACs; an integer d to sum the rows under each d-component path prefix
      into one row (depth=1: stem, one row per block, classifier).

  Returns:
    A `Summary`; see the module docstring for the counting rules.

  Raises:
    ValueError: if some parameters belong to no traced `__call__` (e.g. a
      module used only through another method), so the rows would not add up.
  """
  calls, params = _trace_calls(model, input_shape, dtype)
  owned = _own_params(params)
  layers, seen = [], set()
  for call in calls:
    costs_macs = isinstance(call.module, (BinaryConv, nn.Conv, nn.Dense))
    if call.path in owned or costs_macs:
      layers.append(_layer_cost(call, owned.get(call.path, {}),
                                count_params=call.path not in seen))
      seen.add(call.path)
  missing = sorted("/".join(p) for p in set(owned) - seen)
  if missing:
    raise ValueError(f"parameters of {missing} belong to no traced __call__")
  if depth is not None:
    layers = _group(calls, layers, depth)
  return Summary(model=type(model).__name__, input_shape=tuple(input_shape),
                 layers=tuple(layers))


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command line: prints the table, or one JSON object with --json."""
  parser = argparse.ArgumentParser(
      prog="python -m bnn_jax.summary",
      description="Parameters by precision, memory, BOPs, FLOPs and OPs.")
  parser.add_argument("--model", required=True, choices=sorted(models.MODELS))
  parser.add_argument("--input_size", type=int, default=224,
                      help="input height = width")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--input_channels", type=int, default=3)
  parser.add_argument("--depth", type=int, default=None,
                      help="sum the rows under each path prefix of this many "
                      "components (1: one row per block); default: one row "
                      "per layer")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object instead of the table")
  args = parser.parse_args(argv)
  model = models.create(args.model, num_classes=args.num_classes)
  s = summarize(model, (args.input_size, args.input_size,
                        args.input_channels), depth=args.depth)
  print(json.dumps(s.to_dict()) if args.json else s.table())


if __name__ == "__main__":
  main()
