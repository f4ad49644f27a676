"""The training stream: the record every process reads at every step, as batch dicts.

make_train_iterator(data_config, B, seed=..., start_step=...) yields rethink_jax/data/pipeline.py's
batch dicts (records from its builders, preprocessed and batched by rethink_jax/data/preprocess.py).

Order and sharding. The training stream of every process is cut from one global stream: position t
of the global stream is record pool[perm_e[t % N]] with e = t // N, where pool holds the N usable
training records (subset, empty images dropped) and perm_e is a permutation drawn from (seed, e).
Global step s uses positions [s * B * P, (s + 1) * B * P); process p takes the B positions starting
at s * B * P + p * B (B = batch per process, P = processes). Hence processes never duplicate data,
an epoch is covered exactly once, and resuming at start_step=k reads from position k * B * P without
decoding anything before it (records are read by index from array_record files). Augmentation
randomness is a function of (seed, t) only.

Orientation buckets (data.pad_buckets; pipeline.py's docstring has the padding rule). Steps are
cut from the same global stream by Detectron2's grouping, applied globally: position t goes to
its bucket's buffer, and a buffer that reaches B * P positions becomes the next global step
(process p again takes its B positions at p * B). Every process computes the same steps from the
records' sizes alone (no decoding, no communication), so every process has the same bucket, hence
batch shape, at a step; resuming at step k replays the grouping from the sizes. A step may hold
positions of two epochs; an epoch's positions are still each used once. Without pad_buckets (()),
step s is positions [s * B * P, (s + 1) * B * P) as above.

Bad records. A training record that cannot be read or decoded (a truncated image, a damaged
record) stops the iterator with a BadRecordError at the step whose batch holds it, naming the
step, the position, the record (index, split, file) and its image id. With
data.skip_bad_records=True it is skipped instead: position t then takes the record of the first
position after t whose record decodes (in t's orientation bucket; with position t's
augmentation), so every batch keeps its size, every later position its record, and a resumed run
skips the same way; the skipped records are counted (TrainIterator.skipped_before) and logged as
warnings.
"""

import os

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rethink_jax.data import pipeline
from rethink_jax.data import preprocess


def train_positions(
  step: int, batch_size_per_process: int, process_index: int, process_count: int
) -> range:
  """Global stream positions of one process's batch at `step`: (B,) int64."""
  start = (step * process_count + process_index) * batch_size_per_process
  return np.arange(start, start + batch_size_per_process, dtype=np.int64)


class _EpochPermutations:
  """perm_e of the module docstring, cached for the current epoch."""

  def __init__(self, n, seed):
    self.n, self.seed, self._epoch, self._perm = n, seed, None, None

  def __call__(self, epoch):
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.n)
    return self._perm


class BadRecordError(ValueError):
  """A training record that cannot be read or decoded; the message names it and the step."""


class _TrainRecords:
  """Position t of the training stream -> its record (module docstring, "Order and sharding"),
  with the replacements of records found bad (data.skip_bad_records)."""

  def __init__(self, builder, base_split, pool, seed, preprocess, bucket_ids=None):
    self.source = pipeline._data_source(builder, base_split)
    self.pool, self.n, self.seed = pool, len(pool), seed
    self.bucket_ids = bucket_ids  # (N,) orientation bucket per pool index, None: one bucket
    self.preprocess = preprocess
    self.replaced = {}  # position -> record read there instead of its own (it did not decode)
    self._perms = _EpochPermutations(self.n, seed)  # the generator's (it runs in a TF thread)
    self._split = base_split
    self._image_ids = pipeline.records_meta(builder, base_split)["image_id"]
    info = builder.info.splits[base_split]
    self._files = [os.fspath(p) for p in info.filepaths]
    self._file_ends = np.cumsum(info.shard_lengths)

  def _pool_index(self, t: int, perms=None) -> int:
    return int((perms or self._perms)(t // self.n)[t % self.n])

  def record(self, t: int, perms=None) -> int:
    """The record index of position t (without replacements)."""
    return int(self.pool[self._pool_index(t, perms)])

  def serialized(self, t: int) -> bytes:
    """What position t feeds the pipeline."""
    return self.source[self.replaced.get(t, self.record(t))]

  def problem(self, t: int, record: int) -> str | None:
    """Why `record` cannot be read or preprocessed at position t; None if it can."""
    try:
      serialized = self.source[record]
    except Exception as e:  # pylint: disable=broad-except
      return f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    try:
      self.preprocess(tf.constant(t, tf.int64), tf.constant(serialized), tf.constant(True))
    except (tf.errors.OpError, ValueError) as e:
      message = getattr(e, "message", str(e)).strip().splitlines()[0][:200]
      return f"does not decode ({type(e).__name__}: {message})"
    return None

  def bad_positions(self, positions) -> list[tuple[int, int, str]]:
    """(position, record, problem) of each given position whose record fails (a diagnosis, run
    only after the pipeline failed: it reads and decodes those records again)."""
    perms = _EpochPermutations(self.n, self.seed)  # not the generator's cache
    bad = []
    for t in positions:
      t = int(t)
      record = self.replaced.get(t, self.record(t, perms))
      why = self.problem(t, record)
      if why is not None:
        bad.append((t, record, why))
    return bad

  def describe(self, step: int, t: int, record: int, why: str) -> str:
    file = self._files[int(np.searchsorted(self._file_ends, record, side="right"))]
    return (
      f"training record {record} of split {self._split!r} (image id "
      f"{int(self._image_ids[record])}, file {file}), read at stream position {t} for the batch "
      f"of step {step}: {why}"
    )

  def replace(self, t: int) -> int:
    """Makes position t read the record of the first later position that decodes (and, with
    orientation buckets, pads to t's bucket, the shape of t's step); returns it."""
    perms = _EpochPermutations(self.n, self.seed)
    bucket = None if self.bucket_ids is None else self.bucket_ids[self._pool_index(t, perms)]
    for u in range(t + 1, t + 1 + self.n):
      if bucket is not None and self.bucket_ids[self._pool_index(u, perms)] != bucket:
        continue
      record = self.record(u, perms)
      if self.problem(t, record) is None:
        self.replaced[t] = record
        return record
    raise BadRecordError(f"no training record after stream position {t} decodes")


class StepPlan:
  """The global steps of the training stream: plan(step) -> (positions t, pool indices), both
  (B * P,) int64, process p's share at [p * B, (p + 1) * B).

  Without buckets, step s is positions [s * B * P, (s + 1) * B * P). With buckets (bucket_ids not
  None), the module docstring's grouping: positions fill one buffer per bucket in stream order and
  a full buffer is the next step. Steps are computed an epoch at a time from the buckets of the
  pool's records only; asking for an earlier step than the last replays from the start.

  Args:
    n: pool size N; seed: data seed (the epoch permutations); global_batch: B * P.
    bucket_ids: (N,) bucket of each pool record, or None (one bucket).
  """

  def __init__(self, n: int, seed: int, global_batch: int, bucket_ids: np.ndarray | None = None):
    self.n, self.global_batch = n, global_batch
    self.bucket_ids = None if bucket_ids is None else np.asarray(bucket_ids, np.int64)
    self._perms = _EpochPermutations(n, seed)
    self._reset()

  def _reset(self):
    self._epoch = -1
    self._first = 0  # step of self._steps[0]
    self._steps = np.zeros((0, 2, self.global_batch), np.int64)  # (steps, [t, index], G)
    self._carry = {}  # bucket -> (2, k) positions and indices waiting for a full step

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    if self.bucket_ids is None:
      t = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
      index = np.empty_like(t)
      for e in np.unique(t // self.n):
        mine = t // self.n == e
        index[mine] = self._perms(int(e))[t[mine] % self.n]
      return t, index
    if step < self._first:
      self._reset()
    while step >= self._first + len(self._steps):
      self._next_epoch()
    t, index = self._steps[step - self._first]
    return t, index

  def _next_epoch(self):
    self._first += len(self._steps)
    self._epoch += 1
    index = self._perms(self._epoch)
    t = self._epoch * self.n + np.arange(self.n, dtype=np.int64)
    g = self.global_batch
    full = []
    for k in np.unique(self.bucket_ids):
      mine = self.bucket_ids[index] == k
      pending = np.concatenate(
        [self._carry.get(k, np.zeros((2, 0), np.int64)), np.stack([t[mine], index[mine]])], axis=1
      )
      m = pending.shape[1] // g * g
      full.append(pending[:, :m].reshape(2, -1, g).transpose(1, 0, 2))
      self._carry[k] = pending[:, m:]
    steps = np.concatenate(full)
    # A bucket's step is complete at its last position: steps run in that order.
    self._steps = steps[np.argsort(steps[:, 0, -1], kind="stable")]


class TrainIterator:
  """Infinite iterator of training batch dicts; `step` is the step of the next batch.

  Checkpoint `step` (or the trainer's own step) and pass it back as start_step to resume.
  `skipped` lists (step, description) of every record skipped so far (data.skip_bad_records).
  """

  def __init__(self, make_batches, records, positions, start_step, skip_bad_records):
    self._make_batches = make_batches  # step -> numpy iterator of the batches from that step on
    self._records = records
    self._positions = positions  # step -> this process's stream positions of that step
    self._skip = skip_bad_records
    self._it = make_batches(start_step)
    self.step = start_step
    self.skipped = []

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._it)
    except (tf.errors.OpError, UnicodeDecodeError) as e:  # TF's message may quote the bytes
      bad = self._records.bad_positions(self._positions(self.step))
      if not bad:
        raise
      if not self._skip:
        raise BadRecordError(
          self._records.describe(self.step, *bad[0])
          + ". Set data.skip_bad_records=True to skip such records, or rebuild the data set."
        ) from e
      for t, record, why in bad:
        instead = self._records.replace(t)
        what = self._records.describe(self.step, t, record, why)
        logging.warning("skipped %s; position %d reads record %d instead", what, t, instead)
        self.skipped.append((self.step, what))
      self._it = self._make_batches(self.step)  # the same step again, with the replacements
      return next(self)
    self.step += 1
    return batch

  def skipped_before(self, step: int) -> int:
    """How many records were skipped in the batches of the steps before `step`."""
    return sum(1 for s, _ in self.skipped if s < step)


def make_train_iterator(
  data_config: ml_collections.ConfigDict,
  batch_size_per_process: int,
  *,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainIterator:
  """The training iterator of this process (see the module docstring for order and sharding).

  Args:
    data_config: config.data.
    batch_size_per_process: B, images per process and step.
    seed: data seed (order and augmentation).
    start_step: first step to yield; resuming at k gives exactly the batches an uninterrupted
      iterator yields from step k on.
    process_index, process_count: default jax.process_index() / jax.process_count().
  Returns:
    a TrainIterator of batch dicts (host-local numpy, fixed shapes); it raises BadRecordError
    at the step whose batch holds a record that does not decode (unless data.skip_bad_records).
  """
  p, num_p = pipeline._process(process_index, process_count)
  builder = pipeline.get_builder(data_config)
  base, _ = pipeline._split_range(builder, data_config.train_split)
  preprocess_fn = preprocess.make_preprocess_fn(
    data_config,
    builder.info.features,
    train=True,
    seed=seed,
    keypoint_flip_indices=pipeline.keypoint_flip_indices(data_config, builder),
  )
  pool = pipeline.train_pool(data_config, builder)
  b = int(batch_size_per_process)
  plan = make_step_plan(data_config, builder, pool, seed, b * num_p)
  records = _TrainRecords(builder, base, pool, seed, preprocess_fn, plan.bucket_ids)
  # A StepPlan keeps state: each generator (a TF thread) and each diagnosis gets its own.
  new_plan = lambda: StepPlan(len(pool), seed, b * num_p, plan.bucket_ids)

  def positions(step, step_plan=None):
    return (step_plan or new_plan())(step)[0][p * b : (p + 1) * b]

  def make_batches(first_step):
    def gen():
      step, step_plan = first_step, new_plan()
      while True:
        for t in positions(step, step_plan):
          yield t, records.serialized(int(t)), True
        step += 1

    ds = preprocess._records_dataset(gen)
    return preprocess._to_batches(ds, data_config, preprocess_fn, b).as_numpy_iterator()

  skip = bool(data_config.get("skip_bad_records", False))
  return TrainIterator(make_batches, records, positions, start_step, skip)


def make_step_plan(
  data_config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  pool: np.ndarray,
  seed: int,
  global_batch: int,
) -> StepPlan:
  """The StepPlan of config.data's training stream (pool: train_pool's record indices)."""
  buckets = preprocess.pad_buckets(data_config)
  bucket_ids = None
  if len(set(preprocess._bucket_pad_hws(data_config))) > 1:
    base, _ = pipeline._split_range(builder, data_config.train_split)
    bucket_ids = preprocess.bucket_of(pipeline.record_sizes(builder, base)[pool], buckets)
  return StepPlan(len(pool), seed, global_batch, bucket_ids)
