"""A training record whose image does not decode, in the middle of the training stream.

A copy of shapes_instances/tiny gets one record's JPEG bytes (or the whole serialized record)
truncated inside its array_record file. By default the training iterator yields the batches
before it unchanged and raises at the step whose batch holds it, naming the record, its split and
file, its image id and the step. With data.skip_bad_records the stream goes on: the bad position
reads the record of the next position, every other batch equals the undamaged data set's, the
skip is counted at its step, and a run resumed at that step skips the same way.
"""

import os
import shutil

import numpy as np
import pytest

B = 2  # images per step


def corrupt_train_record(data_dir: str, dest: str, record, part: str = "image") -> int:
  """Copies the tfds data dir `data_dir` to `dest` with training record `record` (an index or a
  list of them) damaged: its image truncated to half its bytes (part="image", the rest intact)
  or the whole serialized record truncated to half (part="record"). Returns its image id (the
  last one's)."""
  import glob  # pylint: disable=g-import-not-at-top

  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  shutil.copytree(data_dir, dest)
  (path,) = glob.glob(os.path.join(dest, "shapes_instances", "tiny", "*", "*-train.array_record*"))
  reader = array_record_module.ArrayRecordReader(path)
  records = list(reader.read_all())
  reader.close()
  for r in np.atleast_1d(record):
    example = tf.train.Example.FromString(records[r])
    image = example.features.feature["image"].bytes_list.value
    image[0] = image[0][: len(image[0]) // 2]
    if part == "image":
      records[r] = example.SerializeToString()
    else:
      records[r] = records[r][: len(records[r]) // 2]
  os.remove(path)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  return int(example.features.feature["image_id"].int64_list.value[0])


def _batches(config, seed, start_step, num_steps):
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  it = stream.make_train_iterator(
    config, B, seed=seed, start_step=start_step, process_index=0, process_count=1
  )
  return it, [next(it) for _ in range(num_steps)]


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(params=["image", "record"])
def damaged(request, tiny_config, tmp_path):
  """(clean config, damaged config, bad step, bad index in its batch, record, image id, seed)."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  bad_step, bad_index = int(rng.integers(1, 4)), int(rng.integers(B))
  _, clean = _batches(tiny_config, seed, bad_step, 1)
  image_id = int(clean[0]["image_id"][bad_index])
  builder = pipeline.get_builder(tiny_config)
  (record,) = np.flatnonzero(pipeline.records_meta(builder, "train")["image_id"] == image_id)
  damaged_config = tiny_config.copy_and_resolve_references()
  damaged_config.data_dir = str(tmp_path / "tfds")
  got = corrupt_train_record(tiny_config.data_dir, damaged_config.data_dir, record, request.param)
  assert got == image_id
  return tiny_config, damaged_config, bad_step, bad_index, int(record), image_id, seed


def test_bad_record_stops_at_its_step_naming_it(damaged):
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  clean_config, config, bad_step, bad_index, record, image_id, seed = damaged
  _, want = _batches(clean_config, seed, 0, bad_step)
  it, got = _batches(config, seed, 0, bad_step)
  for a, b in zip(got, want):
    _assert_same(a, b)
  position = bad_step * B + bad_index
  with pytest.raises(stream.BadRecordError) as err:
    next(it)
  message = str(err.value)
  for part in (
    f"training record {record} of split 'train'",
    f"image id {image_id}",
    "-train.array_record",
    f"stream position {position} for the batch of step {bad_step}",
    "skip_bad_records",
  ):
    assert part in message, (part, message)


def test_skip_bad_records_replaces_counts_and_resumes_alike(damaged):
  clean_config, config, bad_step, bad_index, _, image_id, seed = damaged
  config.skip_bad_records = True
  clean_config.skip_bad_records = True  # no effect on sound data
  num = bad_step + 3
  _, want = _batches(clean_config, seed, 0, num)
  it, got = _batches(config, seed, 0, num)
  for step in range(num):
    if step != bad_step:
      _assert_same(got[step], want[step])
  bad = got[bad_step]
  others = [i for i in range(B) if i != bad_index]
  for k in bad:
    np.testing.assert_array_equal(bad[k][others], want[bad_step][k][others], err_msg=k)
  # The bad position reads the next position's record (the stream's next image).
  following = np.concatenate([want[bad_step]["image_id"], want[bad_step + 1]["image_id"]])
  assert bad["image_id"][bad_index] == following[bad_index + 1] != image_id
  assert [it.skipped_before(s) for s in range(num + 1)] == [0] * (bad_step + 1) + [1] * (
    num - bad_step
  )
  assert f"image id {image_id}" in it.skipped[0][1]
  # Resumed at the bad step: the same batches.
  resumed_it, resumed = _batches(config, seed, bad_step, num - bad_step)
  for a, b in zip(resumed, got[bad_step:]):
    _assert_same(a, b)
  assert resumed_it.skipped_before(num) == 1


def test_damaged_first_and_last_records_are_found_in_the_stream(tiny_config, tmp_path):
  """The data source's order check reads the split's first and last records; damaged ones are
  left to the stream, which skips (or names) them where they come."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import stream  # pylint: disable=g-import-not-at-top

  ids = pipeline.records_meta(pipeline.get_builder(tiny_config), "train")["image_id"]
  config = tiny_config.copy_and_resolve_references()
  config.data_dir = str(tmp_path / "tfds")
  corrupt_train_record(tiny_config.data_dir, config.data_dir, [0, len(ids) - 1], "record")
  config.skip_bad_records = True
  seed = int(np.random.default_rng().integers(1 << 30))
  it = stream.make_train_iterator(
    config, B, seed=seed, start_step=0, process_index=0, process_count=1
  )
  seen = np.concatenate([next(it)["image_id"] for _ in range(len(ids) // B)])
  assert ids[0] not in seen and ids[-1] not in seen
  skipped = " ".join(why for _, why in it.skipped)
  assert len(it.skipped) == 2, it.skipped
  assert f"image id {ids[0]}" in skipped and f"image id {ids[-1]}" in skipped, skipped


def test_size_scan_of_an_older_build_names_a_damaged_record(tiny_config, tmp_path):
  """Builds whose records/<split>.json has no sizes read them from the records: one that does not
  parse is named (index, split, image id), not left to TensorFlow's parse error."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  ids = pipeline.records_meta(pipeline.get_builder(tiny_config), "train")["image_id"]
  record = int(np.random.default_rng().integers(len(ids)))
  config = tiny_config.copy_and_resolve_references()
  config.data_dir = str(tmp_path / "tfds")
  corrupt_train_record(tiny_config.data_dir, config.data_dir, record, "record")
  builder = pipeline.get_builder(config)
  with pytest.raises(ValueError) as err:
    pipeline.sizes_from_records(builder, "train", chunk=5)
  message = str(err.value)
  for part in (config.data_dir, f"record {record} of split 'train' (image id {ids[record]})"):
    assert part in message, (part, message)
  sound = pipeline.sizes_from_records(pipeline.get_builder(tiny_config), "train", chunk=5)
  np.testing.assert_array_equal(
    sound, pipeline.record_sizes(pipeline.get_builder(tiny_config), "train")
  )
