"""Optimizer chains from a phase's optimizer config (optax).

Modules: `config` (fields, defaults, validation), `registry` (chain names),
`masks` (decay group, Bop's kernels, config groups), `bop`, `schedules`,
`chains` (assembly; `build` gives a phase's chain and logged rate).

The AdamBNN recipe (docs/recipe.md#training-recipe) trains with Adam
(b1 0.9, b2 0.999, eps 1e-8), a per-epoch linear learning-rate decay and, in
step 1, a small weight decay on a fixed group of parameters.

Chains (`name`):

* built-ins: `adam` (mode as configured), `adamw` (`adam`, decoupled), `sgd`
  (heavy-ball or Nesterov momentum, torch SGD semantics), `lamb` (You et al.
  2020), and `bop`: Bop (Helwegen et al., NeurIPS 2019, "Latent weights do
  not exist") on the binary kernels, the chain named by `bop_rest` (Adam by
  default; any name accepted here except `bop`) on every other parameter;
* a name given to `register(name, factory)`;
* a dotted optax path, e.g. `optax.lion`, `optax.adafactor`,
  `optax.contrib.muon`: the function is looked up in optax.

A registered factory or an optax function is called as
`factory(schedule, **kwargs)` with the phase's learning-rate schedule (below)
and `kwargs` (`--config.phases.step2.optimizer.kwargs="{'b1': 0.95}"`). An
optax function with a `weight_decay` argument gets `weight_decay=0.0` unless
`kwargs` sets it, so that weight decay stays what `weight_decay`,
`weight_decay_mode` and the decay group below say (optax.lion's own default
would decay every parameter, BatchNorm included). Every chain, built-in or
not, gets the same schedule, decay, clipping, multipliers and logging.

Weight decay, two modes (`weight_decay_mode`), lambda = `weight_decay`,
M = the decay mask, g = gradient, w = parameter, eta_t = learning rate:

* `coupled` (the reference: torch Adam's `weight_decay`, an L2 penalty):
      g'  = g + lambda * M * w                 (before the moments)
      m_t = b1 m + (1 - b1) g',  v_t = b2 v + (1 - b2) g'^2
      w  <- w - eta_t * m_hat / (sqrt(v_hat) + eps)
  i.e. `add_decayed_weights` BEFORE `scale_by_adam`. Adam's normalisation
  rescales the decay per weight, so its strength depends on the gradients.
* `decoupled` (AdamW, Loshchilov & Hutter 2019; the default for new configs):
      w  <- w - eta_t * (m_hat / (sqrt(v_hat) + eps) + lambda * M * w)
  computed from the moments of g alone; the decay is multiplied by eta_t as
  in optax.adamw and torch AdamW.
The same rule holds for the other chains: `coupled` adds lambda * M * w to the
gradient before the optimizer's own preconditioner (SGD momentum, Adam's
moments in LAMB, the whole of a registered or optax chain); `decoupled` adds
it to the preconditioned update (for a registered or optax chain u, whose
update already includes -eta_t: u - eta_t * lambda * M * w).

The reference decay group M (the torch code selects `p.ndim == 4 or 'conv' in
name`; its shifts are (1, C, 1, 1), hence 4-D): every 4-D parameter (all conv
kernels, the real-valued stem included) and every learnable shift (`shift`,
`shift_in`, `shift_out`); NOT the BatchNorm scale/bias, the PReLU slopes or the
FC kernel/bias. On ReActNet-A that is 28,285,792 of 29,343,592 parameters.
`decay_regexes` replaces the group by the parameters whose '/'-joined path
matches (re.fullmatch) one of the regexes.

Learning-rate multipliers (`lr_mults`, as big_vision's `lr_mults`): pairs
(regex, m); the final update of a parameter whose '/'-joined path fullmatches
a regex (the first that matches) is multiplied by m (0 freezes it); other
parameters keep m = 1. Every regex must match some parameter.

Parameter groups (`groups`, as optax.partition / Larq's CaseOptimizer):
triples (label, regex, overrides), overrides a dict of fields or
(field, value) pairs. A parameter belongs to the first group
whose regex fullmatches its '/'-joined path; every parameter must belong to
a group and every group must have a parameter. Each group trains with its
own chain: the phase's optimizer fields updated by `overrides` (a dict of
fields: name, learning_rate, schedule, warmup_epochs, momentum, ...), with
its own schedule; gradient clipping (`grad_clip_norm`) stays global, over
all groups. The train step logs each group's rate as 'train/lr/<label>'
(and the first group's as 'train/lr'). QuickNet's recipe:
  groups = (("binary", BINARY_KERNEL_REGEX, {"name": "adam",
             "learning_rate": 1e-2}),
            ("real", ".*", {"name": "sgd", "momentum": 0.9,
             "learning_rate": 0.1}))

Weight clip (`weight_clip`, Larq's `WeightClip` kernel constraint): after
the update, w <- clip(w, -c, c) for every parameter of the chain (set it in
the binary kernels' group).

Learning-rate schedules (`schedule`; base = `learning_rate`, E epochs of S
steps, T = E * S):

* `linear_epoch` (reference): epoch e = floor(t / S) (0-based) runs at
  base * (1 - (e + 1) / E), constant within the epoch; the last epoch at 0.
* `linear`: base * (1 - t / T), per step.
* `cosine`: base * (1 + cos(pi * t / T)) / 2.
* `constant`: base.
* `step`: base * step_factor^k, k = the number of `step_epochs` boundaries
  b with t >= b * S (absolute epochs, the warm-up included; Larq Zoo's
  BinaryResNetE18 and Real-to-Binary schedules).
An optional linear warm-up from 0 to base over W = `warmup_epochs` * S steps
comes first; the decay then runs over the remaining T - W steps (E - W / S
epochs), as in optax.warmup_cosine_decay_schedule. The schedule is passed to
the chain itself (optax counts the updates in its state); the train step logs
schedule(step), the rate of the update it applies
(`train_step.make_train_step(..., learning_rate=schedule)`).
"""

from bnn_jax.optim.bop import BopState, bop
from bnn_jax.optim.chains import (Built, build, build_optimizer,
                                  logged_learning_rate, weight_clip)
from bnn_jax.optim.config import (ADAPTIVE_OPTIMIZERS, SCHEDULES,
                                  WEIGHT_DECAY_MODES, ConfigLike,
                                  ResolvedConfig, default_optimizer_config,
                                  group_config, resolve_config,
                                  warn_if_no_training)
from bnn_jax.optim.masks import (BINARY_KERNEL_REGEX, SHIFT_PARAM_NAMES,
                                 bop_labels, group_labels,
                                 reference_decay_mask, weight_decay_mask)
from bnn_jax.optim.registry import (OPTAX_PREFIX, OPTIMIZERS, ChainFactory,
                                    chain_factory, register, registered)
from bnn_jax.optim.schedules import (build_schedule, learning_rate,
                                     linear_epoch_schedule)
