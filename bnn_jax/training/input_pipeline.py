"""Input pipeline: TFDS -> per-host split -> augment -> batch -> jax.Array.

Data sets, their recipes and the per-example ops live in
`bnn_jax.training.preprocess`; this module is the host side: TFDS builders, the
per-process split, batching, and the train/eval iterators.

Training batches (`train_iterator`): dict(image=float32 [B, H, W, C],
label=int32 [B]), infinite. The last partial batch of an epoch is dropped:
every process runs `steps_per_epoch = num_train // global_batch_size` steps
per epoch. Epoch e gets two seeds from (seed, shard, e) (shard below). One
shuffles the examples (the file order too where the shuffle buffer cannot
hold the whole stream), so every epoch is a fresh permutation that holds
each example once. The other seeds the augmentation, which uses only
stateless random ops: an example's randomness is drawn from (that seed, its
position in the epoch's stream), for the per-batch recipes from (that seed,
the position of the stream batch's first example), drawn for the whole
stream batch and sliced. So the batches are a pure function of (config,
seed, process count), and batch k is the same whatever `start_step` a run
resumed from. Resuming at step k starts epoch k // steps_per_epoch and skips
that epoch's first examples before they are augmented.

Multi-process: process p feeds rows [p * B / P, (p + 1) * B / P) of every
global batch of B examples (P processes; with `sharding`, the rows its
devices hold, which must be such a block). Two ways to share the data:

* Global order (the whole train split fits the shuffle buffer: cifar10 and
  digits by default; shard = 0): every process reads the whole split,
  shuffles it with the same seed, cuts the same global batches and keeps
  its own rows of each, augmented from the global positions. The global
  batches are then *independent of the process count*: a 2-process run
  trains on exactly the batches of a 1-process run.
* Per-host shards (the split does not fit the buffer: imagenet2012; shard
  = p): process p reads its part of `tfds.even_splits(train_split, P,
  drop_remainder=True)` (dropping at most P - 1 examples), shuffles its
  file order and a window of its examples with its own seed, and cuts
  B / P-example batches from them. Reading 1/P of the files per host is
  what scales to ImageNet on a pod; the price is that the global batches
  depend on the process count (the same data, the same recipe, another
  order).

Shuffle buffer (`shuffle_buffer_size`): by default (None) the whole train
split, which is then decoded once and cached in memory on every process
(cifar10: 50,000 x 3 KiB); 50,000 encoded JPEGs (~5.5 GB) for
imagenet2012, whose epochs are then a window shuffle of a freshly shuffled
file order of the host's shard. A buffer that holds the host's shard but
not the whole split shuffles (and caches) the host's shard whole.

tf.data service (`data_service_address` = a dispatcher's host:port): the
training batches are prepared on the service's workers instead of this
process. The process numbers its unaugmented batches by step, worker i of N
augments steps i, i + N, ..., and the process puts them back in step order,
so batch k is bit for bit the local batch k, whatever the number of workers
(`bnn_jax.data_service`). Evaluation stays in the process.

Evaluation batches (`eval_iterator`): dict(image, label, mask=bool [B]),
finite, for any requested batch E on any topology: B is E rounded up to a
multiple of the device count D (of the process count without `sharding`),
`topology.padded_eval_batch_size`. Process p reads part p of
`tfds.even_splits(split, P)` (sizes differ by at most one), every example
exactly once, then pads with filler examples (all-zero image before or
after normalisation, label 0, mask False) to ceil(ceil(N / P) / (B / P))
batches, the same on every process. Sums over the unmasked rows therefore
count every example once, whatever D and P.

With `sharding` (e.g. `NamedSharding(mesh, P('data'))`) the per-process
batches become global `jax.Array`s through
`jax.make_array_from_process_local_data`; without it they stay numpy arrays.

TensorFlow runs on the host CPU only: importing this module hides every GPU
from it, so it never reserves accelerator memory.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterator, Optional

import tensorflow as tf

# Before anything touches TensorFlow's devices: the accelerators belong to JAX.
tf.config.set_visible_devices([], "GPU")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from bnn_jax.training import data_service  # noqa: E402
from bnn_jax.training import multihost  # noqa: E402
from bnn_jax.training import preprocess  # noqa: E402
from bnn_jax.training import topology  # noqa: E402
from bnn_jax.training.preprocess import default_dataset_config  # noqa: E402,F401

__all__ = [
    "DatasetInfo",
    "DatasetNotFoundError",
    "default_dataset_config",
    "eval_iterator",
    "get_info",
    "steps_per_epoch",
    "train_iterator",
]

Batch = dict[str, Any]


class DatasetNotFoundError(ValueError):
  """The data set is not prepared in its TFDS data_dir (and cannot be made)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about a data set.

  Attributes:
    name: TFDS name.
    num_classes: number of labels.
    image_shape: model input (H, W, C).
    num_train: examples in the train split (all processes together).
    num_eval: examples in the eval split (all processes together).
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int


def _complete(dataset_cfg: ml_collections.ConfigDict
              ) -> ml_collections.ConfigDict:
  """`dataset_cfg` over `default_dataset_config(dataset_cfg.name)`."""
  cfg = default_dataset_config(dataset_cfg.name)
  cfg.update(dataset_cfg.to_dict())  # plain values, not FieldReferences
  if cfg.data_service_address:  # A malformed address fails before any work.
    data_service.parse_address(cfg.data_service_address)
  return cfg


def _builder(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; raises DatasetNotFoundError if there is none."""
  recipe = preprocess.get_recipe(cfg.name)
  if recipe.prepare:
    return recipe.prepare(cfg.data_dir, report=multihost.report)
  builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  if not builder.is_prepared():
    data_dir = str(builder.data_dir_root)
    raise DatasetNotFoundError(
        f"{cfg.name} is not prepared in {data_dir}: "
        + recipe.how_to_prepare.format(data_dir=data_dir) + ".")
  return builder


def _image_size(cfg: ml_collections.ConfigDict) -> int:
  return cfg.image_size or preprocess.get_recipe(cfg.name).image_size


def _info(cfg: ml_collections.ConfigDict,
          builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  size = _image_size(cfg)
  return DatasetInfo(
      name=cfg.name,
      num_classes=builder.info.features["label"].num_classes,
      image_shape=(size, size, preprocess.get_recipe(cfg.name).channels),
      num_train=builder.info.splits[cfg.train_split].num_examples,
      num_eval=builder.info.splits[cfg.eval_split].num_examples)


def get_info(dataset_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes and shapes of the data set (prepares digits on first use).

  Raises:
    DatasetNotFoundError: the data set is not prepared in its data_dir.
  """
  cfg = _complete(dataset_cfg)
  return _info(cfg, _builder(cfg))


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Training steps per epoch: num_train // global_batch_size.

  The last partial batch of each epoch is dropped, so every step sees a full
  global batch and every process runs the same number of steps.
  """
  steps = info.num_train // global_batch_size
  if steps == 0:
    raise ValueError(f"global batch {global_batch_size} is larger than the "
                     f"{info.num_train} training examples of {info.name}.")
  return steps


def _process_slot(global_batch_size: int,
                  sharding: Optional[jax.sharding.Sharding]
                  ) -> tuple[int, int]:
  """(slot, count): this process feeds block `slot` of `count` of each batch.

  A global batch of B examples is cut into `count` = process_count blocks
  of B / count consecutive rows; this process provides rows
  [slot * B / count, (slot + 1) * B / count). Without a sharding the slot
  is `jax.process_index()`; with one it is read from the rows of the batch
  that this process's devices hold, which must form such a block (they do
  on a 1-D mesh whose devices are ordered by process, `topology.make_mesh`).

  Raises:
    ValueError: B is not divisible by the process count, or the sharding
      gives this process rows that are not one block.
  """
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by "
                     f"the {count} processes.")
  local = global_batch_size // count
  if sharding is None:
    return jax.process_index(), count
  rows = set()
  for index in sharding.addressable_devices_indices_map(
      (global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  start = min(rows)
  if start % local or rows != set(range(start, start + local)):
    raise ValueError(
        f"process {jax.process_index()}'s devices hold rows {sorted(rows)[:4]}"
        f"... of the global batch, not one block of {local}; shard the batch "
        "over a 1-D mesh of devices ordered by process (topology.make_mesh).")
  return start // local, count


def _to_global(batch: Batch, sharding: Optional[jax.sharding.Sharding]
               ) -> Batch:
  """Per-process numpy batch -> global jax.Arrays laid out by `sharding`."""
  if sharding is None:
    return batch
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def _read(builder: tfds.core.DatasetBuilder, split: Any,
          recipe: preprocess.Recipe,
          shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
  """(recipe.decode(image), int32 label) pairs of `split`.

  Args:
    builder: a prepared builder.
    split: TFDS split or sub-split.
    recipe: gives the decoding.
    shuffle_seed: None reads the files in their stored order; an int reads
      them in an order shuffled with this seed.
  """
  ds = builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                  try_autocache=False, skip_prefetch=True))
  return ds.map(
      lambda ex: (recipe.decode(ex["image"]), tf.cast(ex["label"], tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _epoch_seeds(seed: int, shard: int,
                 epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(shuffle seed, augmentation seed) of one epoch of a stream of examples.

  Args:
    seed: the run's data seed.
    shard: 0 for the global order shared by all processes, the process's
      slot for per-host shards.
    epoch: int64 scalar.
  """
  key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, shard], tf.int64), epoch)
  seeds = tf.random.stateless_uniform([2], seed=key, minval=0,
                                      maxval=2**31 - 1, dtype=tf.int64)
  return seeds[0], seeds[1]


def train_iterator(dataset_cfg: ml_collections.ConfigDict, *,
                   global_batch_size: int, seed: int, start_step: int = 0,
                   sharding: Optional[jax.sharding.Sharding] = None
                   ) -> Iterator[Batch]:
  """Infinite augmented training batches, from step `start_step` on.

  Args:
    dataset_cfg: see `default_dataset_config`; missing fields take defaults.
    global_batch_size: examples per step over all processes.
    seed: fixes the shuffles and the augmentation.
    start_step: the first batch yielded is batch `start_step` of the run.
    sharding: lay batches out as global jax.Arrays (e.g.
      `NamedSharding(mesh, P('data'))`); None yields numpy arrays.

  Returns:
    An iterator of dict(image=float32 [B, H, W, C], label=int32 [B]), B the
    global batch with `sharding`, else the per-process batch.

  Raises:
    DatasetNotFoundError: the data set is not prepared in its data_dir.
    data_service.DataServiceError: `data_service_address` is malformed or
      no dispatcher answers there.
  """
  cfg = _complete(dataset_cfg)
  if cfg.data_service_address:  # Fail now, not at the first batch.
    data_service.check_reachable(cfg.data_service_address)
  stream = TrainStream.create(cfg, global_batch_size=global_batch_size,
                              seed=seed, sharding=sharding)
  return stream.batches(start_step)


@dataclasses.dataclass(frozen=True)
class TrainStream:
  """What one process reads for training, and how it becomes its batches.

  The stream is the whole train split with global batches (global order:
  when the shuffle buffer holds the split), or this process's shard of it
  with its own batches (per-host shards). Epoch e of the stream is shuffled
  with `_epoch_seeds(seed, shard, e)` and cut to whole steps; example p of
  an epoch is augmented with the pair (augment seed, p), so a batch is a
  pure function of (config, seed, step, process count) wherever it is made:
  here (`local_batches`) or on tf.data service workers (`service_batches`).
  """
  cfg: ml_collections.ConfigDict
  builder: tfds.core.DatasetBuilder
  recipe: Any
  image_size: int
  seed: int
  sharding: Optional[jax.sharding.Sharding]
  steps: int            # steps per epoch
  slot: int             # this process's rows of each global batch
  local_batch: int      # examples per step on this process
  split: Any            # the stream's TFDS split
  shard: int            # which shard the stream is (0: the whole split)
  stream_batch: int     # examples per step in the stream
  stream_size: int
  buffer_size: int

  @classmethod
  def create(cls, cfg: ml_collections.ConfigDict, *, global_batch_size: int,
             seed: int, sharding: Optional[jax.sharding.Sharding]
             ) -> "TrainStream":
    builder = _builder(cfg)
    info = _info(cfg, builder)
    slot, num_slots = _process_slot(global_batch_size, sharding)
    local_batch = global_batch_size // num_slots
    if (not cfg.shuffle_buffer_size
        or cfg.shuffle_buffer_size >= info.num_train):
      split, shard, stream_batch = cfg.train_split, 0, global_batch_size
    else:
      split = tfds.even_splits(cfg.train_split, n=num_slots,
                               drop_remainder=True)[slot]
      shard, stream_batch = slot, local_batch
    stream_size = builder.info.splits[split].num_examples
    return cls(cfg=cfg, builder=builder,
               recipe=preprocess.get_recipe(cfg.name),
               image_size=_image_size(cfg), seed=seed, sharding=sharding,
               steps=steps_per_epoch(info, global_batch_size), slot=slot,
               local_batch=local_batch, split=split, shard=shard,
               stream_batch=stream_batch, stream_size=stream_size,
               buffer_size=min(cfg.shuffle_buffer_size or stream_size,
                               stream_size))

  def epoch_examples(self, records: tf.data.Dataset,
                     epoch: tf.Tensor) -> tf.data.Dataset:
    """One epoch of the stream, shuffled and cut to whole steps.

    Args:
      records: (image, label) pairs.
      epoch: int64 scalar.

    Returns:
      (augmentation seed, position in the epoch's stream, (image, label))
      triples.
    """
    shuffle_seed, augment_seed = _epoch_seeds(self.seed, self.shard, epoch)
    num_examples = self.steps * self.stream_batch
    return tf.data.Dataset.zip(  # zip, not map: cheaper per element.
        tf.data.Dataset.from_tensors(augment_seed).repeat(),
        tf.data.Dataset.range(num_examples),
        records.shuffle(self.buffer_size, seed=shuffle_seed).take(
            num_examples))

  def prepare_example(self, augment_seed, position, example) -> Batch:
    """Augmented (or, without `augment`, eval-resized) and normalised."""
    images, labels = example
    recipe, size = self.recipe, self.image_size
    if not self.cfg.augment:
      images = recipe.eval(images, size)
    elif recipe.batched:
      # Draw for the whole stream batch, use this process's rows of it.
      offset = position % self.stream_batch
      images = recipe.train(images, size,
                            tf.stack([augment_seed, position - offset]),
                            draws=self.stream_batch,
                            offset=tf.cast(offset, tf.int32))
    else:
      images = recipe.train(images, size, tf.stack([augment_seed, position]))
    return {"image": preprocess.normalise(images, recipe), "label": labels}

  def local_batches(self, ds: tf.data.Dataset) -> Iterator[Batch]:
    """The batches of `ds` (this process's examples), prepared here."""
    if self.recipe.batched:
      ds = ds.batch(self.local_batch, drop_remainder=True).map(
          lambda seeds, positions, batch: self.prepare_example(
              seeds[0], positions[0], batch),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
      ds = ds.map(self.prepare_example, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
      ds = ds.batch(self.local_batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return (_to_global(batch, self.sharding)
            for batch in ds.as_numpy_iterator())

  def service_batches(self, ds: tf.data.Dataset, first_step: int,
                      num_batches: Optional[int]) -> Iterator[Batch]:
    """The batches of `ds` (this process's examples), prepared remotely.

    The unaugmented batches are numbered by step and cut by step among the
    tf.data service's workers (`data_service.distribute`), which run
    exactly `local_batches`' ops on them.
    """
    local_batch = self.local_batch
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(first_step),
                             ds.batch(local_batch, drop_remainder=True))
    ds = data_service.shard_by_step(ds)  # Worker i of N: steps i mod N.
    if self.recipe.batched:
      ds = ds.map(lambda step, batch: (step, self.prepare_example(
          batch[0][0], batch[1][0], batch[2])),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
      ds = ds.map(lambda step, batch: (tf.fill([local_batch], step), *batch))
      ds = ds.unbatch().map(
          lambda step, *example: (step, self.prepare_example(*example)),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      ds = ds.batch(local_batch, drop_remainder=True).map(
          lambda steps, batch: (steps[0], batch))
    return (_to_global(batch, self.sharding)
            for batch in data_service.distribute(
                ds, self.cfg.data_service_address, first_step=first_step,
                num_batches=num_batches))

  def to_batches(self, examples: tf.data.Dataset, skip: int, first_step: int,
                 num_batches: Optional[int]) -> Iterator[Batch]:
    """`examples` from step `skip` of their epoch on, as batches (here or
    on the tf.data service, `cfg.data_service_address`)."""
    # Skip before augmenting: resuming does not redo the skipped examples.
    ds = examples.skip(skip * self.stream_batch)
    if self.stream_batch != self.local_batch:  # This process's rows.
      ds = ds.filter(lambda seed_, position, example_: tf.equal(
          position % self.stream_batch // self.local_batch, self.slot))
    if self.cfg.data_service_address:
      return self.service_batches(ds, first_step, num_batches)
    return self.local_batches(ds)

  def batches(self, start_step: int) -> Iterator[Batch]:
    """Every batch from step `start_step` on, epoch after epoch."""
    first_epoch, skip_steps = divmod(start_step, self.steps)
    if self.buffer_size == self.stream_size:
      # The buffer holds the whole stream, so the file order does not matter
      # and caching the decoded stream costs no more memory than the buffer:
      # one tf.data graph serves every epoch (no per-epoch start-up cost).
      records = _read(self.builder, self.split, self.recipe).cache()
      yield from self.to_batches(
          tf.data.Dataset.counter(first_epoch).flat_map(
              lambda epoch: self.epoch_examples(records, epoch)), skip_steps,
          start_step, None)
    else:
      # A window shuffle: each epoch also reads the files in a fresh order.
      for epoch in itertools.count(first_epoch):
        epoch_tensor = tf.constant(epoch, tf.int64)
        shuffle_seed, _ = _epoch_seeds(self.seed, self.shard, epoch_tensor)
        records = _read(self.builder, self.split, self.recipe,
                        int(shuffle_seed))
        skip = skip_steps if epoch == first_epoch else 0
        yield from self.to_batches(self.epoch_examples(records, epoch_tensor),
                                   skip, epoch * self.steps + skip,
                                   self.steps - skip)


def eval_iterator(dataset_cfg: ml_collections.ConfigDict, *,
                  global_batch_size: int,
                  sharding: Optional[jax.sharding.Sharding] = None,
                  split: Optional[str] = None) -> Iterator[Batch]:
  """One pass over an eval split, every example once, padded and masked.

  Args:
    dataset_cfg: see `default_dataset_config`; missing fields take defaults.
    global_batch_size: requested examples per batch over all processes, any
      positive number: rounded up to B, the next multiple of the devices of
      `sharding` (of the process count without one).
    sharding: as in `train_iterator`.
    split: the TFDS split (any sub-split syntax); None means
      `dataset_cfg.eval_split`.

  Returns:
    An iterator of dict(image=float32 [B, H, W, C], label=int32 [B],
    mask=bool [B]) (per-process B / P rows without `sharding`); mask is
    False on the filler examples that pad the last batches. Every process
    yields ceil(ceil(N / process_count) / (B / process_count)) batches.

  Raises:
    DatasetNotFoundError: the data set is not prepared in its data_dir.
  """
  cfg = _complete(dataset_cfg)
  builder = _builder(cfg)
  split = split or cfg.eval_split
  shards = (jax.process_count() if sharding is None else
            len(sharding.device_set))
  global_batch_size = topology.padded_eval_batch_size(global_batch_size,
                                                      shards)
  slot, num_slots = _process_slot(global_batch_size, sharding)
  local_batch = global_batch_size // num_slots
  num_examples = builder.info.splits[split].num_examples
  num_batches = math.ceil(math.ceil(num_examples / num_slots) / local_batch)
  recipe = preprocess.get_recipe(cfg.name)
  size = _image_size(cfg)

  def prepare_example(example: Batch) -> Batch:
    images = recipe.eval(example["image"], size)
    return {**example, "image": preprocess.normalise(images, recipe)}

  host_split = tfds.even_splits(split, n=num_slots)[slot]
  ds = _read(builder, host_split, recipe).map(
      lambda image, label: {"image": image, "label": label, "mask": True})
  if not recipe.batched:
    ds = ds.map(prepare_example, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(
      lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat()).take(num_batches * local_batch)
  ds = ds.batch(local_batch)
  if recipe.batched:
    ds = ds.map(prepare_example, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return (_to_global(batch, sharding) for batch in ds.as_numpy_iterator())
