"""Parameter groups by path: the weight-decay group, Bop's binary kernels, config groups.

A mask is a pytree of booleans (or labels) shaped like the params, decided
from each leaf's path (`paths.tree_path`, e.g. `stage_1/binary_3x3/kernel`).
The reference decay group (AdamBNN step 1): every conv and linear kernel,
neither BatchNorm scales/biases nor the learnable shifts.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import jax
import optax

from bnn_jax import paths
from bnn_jax.optim.config import ConfigLike, resolve_config

# Leaf names of the learnable shifts (layers.Shift, layers.RPReLU).
SHIFT_PARAM_NAMES = ("shift", "shift_in", "shift_out")
# The kernels Bop trains: `kernel` of every module named binary_* (the binary
# 3x3 and 1x1 convs of ReActNet-A, the binary 3x3 convs of ReActNet-18).
BINARY_KERNEL_REGEX = r"(.*/)?binary_[^/]*/kernel"
def group_labels(params: Any, groups: Sequence[tuple[str, str, Any]]) -> Any:
  """The label of each parameter: the first group whose regex fullmatches.

  Raises:
    ValueError: a parameter in no group, or a group without parameters.
  """
  def label(name, _):
    for group_label, regex, _ in groups:
      if re.fullmatch(regex, name):
        return group_label
    raise ValueError(f"parameter {name!r} is in no optimizer group (regexes "
                     f"{[g[1] for g in groups]}); add a catch-all '.*' last")
  labels = label_tree(params, label, groups[-1][0])
  empty = sorted(set(g[0] for g in groups) - set(jax.tree.leaves(labels)))
  if empty:
    raise ValueError(f"optimizer groups {empty} match no parameter (such as "
                     f"{param_names(params)[:4]})")
  return labels

# ---------------------------------------------------------------------------
# Parameter groups.


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def label_tree(tree: Any, label: Callable[[str, Any], Any],
                masked_value: Any) -> Any:
  """Maps every leaf to label('/'-joined path, leaf).

  Leaves that optax.partition / optax.masked replaced by MaskedNode get
  `masked_value` (a prefix of the MaskedNode subtree, which optax accepts).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_masked_node)
  return treedef.unflatten([
      masked_value if _is_masked_node(leaf) else
      label(paths.tree_path(path), leaf)
      for path, leaf in flat])


def param_names(tree: Any) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked_node)
  return [paths.tree_path(p) for p, _ in flat]


def _regex_mask(tree: Any, regexes: Sequence[str]) -> Any:
  """True where the path fullmatches a regex; a regex matching nothing errs."""
  names = param_names(tree)
  unmatched = [r for r in regexes
               if not any(re.fullmatch(r, n) for n in names)]
  if unmatched:
    raise ValueError(f"optimizer.decay_regexes {unmatched} match no parameter "
                     f"(re.fullmatch on '/'-joined paths such as "
                     f"{names[:4]})")
  return label_tree(
      tree, lambda name, _: any(re.fullmatch(r, name) for r in regexes), False)


def reference_decay_mask(params: Any) -> Any:
  """The reference decay group: 4-D parameters and learnable shifts.

  M(w) = ndim(w) == 4  or  name(w) in {shift, shift_in, shift_out}: every conv
  kernel (HWIO, the stem included) and every shift; not BN scale/bias, PReLU
  slopes or the FC. (The torch reference selects `p.ndim == 4 or 'conv' in
  name`, where the shifts are (1, C, 1, 1) tensors.)

  Args:
    params: a parameter pytree (arrays or jax.ShapeDtypeStruct leaves).

  Returns:
    A pytree of bools with the structure of `params`.
  """
  return label_tree(
      params,
      lambda name, leaf: (len(leaf.shape) == 4 or
                          name.rsplit("/", 1)[-1] in SHIFT_PARAM_NAMES),
      False)


def weight_decay_mask(params: Any, opt_cfg: ConfigLike) -> Any:
  """The weight-decay mask M of `opt_cfg` on `params` (True = decayed).

  With `decay_regexes` None, the reference group (`reference_decay_mask`);
  otherwise the parameters whose '/'-joined path (e.g.
  'block_1/binary_3x3/kernel') matches one of the regexes (re.fullmatch).

  Raises:
    ValueError: a regex that matches no parameter (a likely typo).
  """
  return decay_mask(params, resolve_config(opt_cfg).decay_regexes)


def decay_mask(params: Any, decay_regexes: Optional[Sequence[str]]) -> Any:
  if decay_regexes is None:
    return reference_decay_mask(params)
  return _regex_mask(params, decay_regexes)


def bop_labels(params: Any) -> Any:
  """'bop' for the binary kernels (BINARY_KERNEL_REGEX), 'rest' elsewhere."""
  labels = label_tree(
      params,
      lambda name, _: ("bop" if re.fullmatch(BINARY_KERNEL_REGEX, name)
                       else "rest"),
      "rest")
  if "bop" not in jax.tree.leaves(labels):
    raise ValueError("optimizer 'bop' found no binary kernel (a `kernel` "
                     "under a module named binary_*) among "
                     f"{param_names(params)[:8]}...")
  return labels


