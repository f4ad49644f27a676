"""Orientation buckets: the global grouping against Detectron2's buffer rule, the iterators'
shapes and sharding on a mixed-orientation COCO-format set, one compiled train step per bucket."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from rethink_jax.data import pipeline
from rethink_jax.data import preprocess
from rethink_jax.data import stream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = int.from_bytes(os.urandom(4), "little")
print("test_buckets seed", SEED)
BUCKETS = ((64, 96), (96, 64))


def detectron2_grouping(bucket_of_index, n, seed, global_batch, num_steps):
  """AspectRatioGroupedDataset over the global stream, written plainly: position t (record
  perm_e[t % n]) joins its bucket's buffer; a full buffer is the next step."""
  perms = {}
  buffers, steps, t = {}, [], 0
  while len(steps) < num_steps:
    e = t // n
    if e not in perms:
      perms[e] = np.random.default_rng([seed, e, 0x5EED]).permutation(n)
    i = perms[e][t % n]
    buf = buffers.setdefault(bucket_of_index[i], [])
    buf.append((t, i))
    if len(buf) == global_batch:
      steps.append(np.asarray(buf).T)
      buffers[bucket_of_index[i]] = []
    t += 1
  return steps


@pytest.mark.parametrize("n,global_batch,share", [(37, 4, 0.3), (10, 8, 0.5), (25, 2, 0.0)])
def test_step_plan_is_detectron2_grouping_and_resumes(n, global_batch, share):
  rng = np.random.default_rng(SEED)
  bucket_ids = (rng.random(n) < share).astype(np.int64)
  plan = stream.StepPlan(n, SEED, global_batch, bucket_ids)
  num_steps = 3 * n // global_batch + 5  # several epochs, steps straddling them
  ref = detectron2_grouping(bucket_ids, n, SEED, global_batch, num_steps)
  got = [plan(s) for s in range(num_steps)]
  for s, (t, index) in enumerate(got):
    np.testing.assert_array_equal(np.stack([t, index]), ref[s], err_msg=f"step {s}")
    assert len(set(bucket_ids[index].tolist())) == 1  # one shape per step
  used = np.concatenate([t for t, _ in got])
  assert len(np.unique(used)) == len(used)  # no position twice
  # Resuming at a later step (a fresh plan replays the grouping) gives the same steps.
  for k in rng.integers(0, num_steps, 3):
    t, index = stream.StepPlan(n, SEED, global_batch, bucket_ids)(int(k))
    np.testing.assert_array_equal(np.stack([t, index]), ref[k])
  # Going back replays too.
  np.testing.assert_array_equal(np.stack(plan(0)), ref[0])


def test_step_plan_without_buckets_is_the_plain_stream():
  n, g = 13, 4
  plan = stream.StepPlan(n, SEED, g)
  for s in (0, 3, 7):
    t, index = plan(s)
    np.testing.assert_array_equal(t, np.arange(s * g, (s + 1) * g))
    perm = lambda e: np.random.default_rng([SEED, e, 0x5EED]).permutation(n)
    np.testing.assert_array_equal(index, [perm(u // n)[u % n] for u in t])
    for p in range(2):  # process p's share is train_positions'
      np.testing.assert_array_equal(t[p * 2 : (p + 1) * 2], stream.train_positions(s, 2, p, 2))


def test_bucket_rule():
  hw = np.array([[480, 640], [640, 480], [500, 500], [10, 11]])
  np.testing.assert_array_equal(preprocess.bucket_of(hw, BUCKETS), [0, 1, 1, 0])
  np.testing.assert_array_equal(preprocess.bucket_of(hw, ((64, 64),)), [0, 0, 0, 0])
  with pytest.raises(ValueError, match="W >= H"):
    preprocess.bucket_of(hw, ((64, 96), (64, 128)))


# Original sizes (h, w): landscape and portrait mixed, one square (a portrait by the rule).
SIZES = [(40, 60), (60, 44), (48, 64), (64, 40), (52, 62), (56, 56), (44, 58), (62, 50)]


def _write_split(root, split, sizes, first_id):
  os.makedirs(os.path.join(root, split))
  rng = np.random.default_rng(first_id)
  images, anns = [], []
  for k, (h, w) in enumerate(sizes):
    image_id = first_id + k
    pixels = rng.integers(0, 80, (h, w, 3), np.uint8)
    x, y, bw, bh = 4, 6, w // 2, h // 3
    pixels[y : y + bh, x : x + bw] = 200
    Image.fromarray(pixels).save(os.path.join(root, split, f"{image_id}.png"))
    images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
    anns.append(
      {
        "id": 100 * image_id,
        "image_id": image_id,
        "category_id": 1 + k % 2,
        "iscrowd": 0,
        "area": float(bw * bh),
        "bbox": [float(x), float(y), float(bw), float(bh)],
        "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
      }
    )
  categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
  with open(os.path.join(root, f"{split}.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": categories}, f)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
  """coco_instances/mini of SIZES (train) and 2 images (validation), built by the CLI."""
  src = str(tmp_path_factory.mktemp("mixed_src"))
  _write_split(src, "train", SIZES, 1)
  _write_split(src, "val", SIZES[:2], 100)
  data_dir = str(tmp_path_factory.mktemp("mixed_tfds"))
  cmd = [
    sys.executable,
    "-m",
    "rethink_jax.data.build",
    f"--data_dir={data_dir}",
    "--name=coco_instances",
    "--config=mini",
    f"--split=train:{src}/train.json:{src}/train",
    f"--split=validation:{src}/val.json:{src}/val",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return data_dir


def _data_config(data_dir):
  c = pipeline.default_data_config()
  c.update(name="coco_instances", builder_config="mini", data_dir=data_dir)
  c.update(min_size=64, max_size=64, pad_to=(96, 96), mask_size=28, max_instances=8)
  c.pad_buckets = BUCKETS
  c.num_parallel_calls = 1
  return c


def test_iterator_batches_by_orientation(mixed_dir):
  """Two processes: at every step both have the bucket of all their images, whose valid region
  fits it with zeros around it; their union is the plan's step; sizes come from records/*.json."""
  c = _data_config(mixed_dir)
  seed, b, steps = SEED % 1000, 2, 7
  its = [
    stream.make_train_iterator(c, b, seed=seed, process_index=p, process_count=2) for p in range(2)
  ]
  builder = pipeline.get_builder(c)
  assert "height" in pipeline.records_meta(builder, "train")
  pool = pipeline.train_pool(c, builder)
  plan = stream.make_step_plan(c, builder, pool, seed, 2 * b)
  sizes = pipeline.record_sizes(builder, "train")
  ids = pipeline.records_meta(builder, "train")["image_id"]
  seen = set()
  for s in range(steps):
    batches = [next(it) for it in its]
    shape = batches[0]["image"].shape[1:3]
    assert shape in BUCKETS and all(x["image"].shape[1:3] == shape for x in batches)
    seen.add(shape)
    _, index = plan(s)
    got_ids = np.concatenate([x["image_id"] for x in batches])
    np.testing.assert_array_equal(got_ids, ids[pool[index]])
    got_hw = np.concatenate([x["orig_hw"] for x in batches])
    np.testing.assert_array_equal(got_hw, sizes[pool[index]])
    for x in batches:
      orig = x["orig_hw"]
      want = BUCKETS[0] if orig[0, 1] > orig[0, 0] else BUCKETS[1]
      assert shape == want and np.all((orig[:, 1] > orig[:, 0]) == (orig[0, 1] > orig[0, 0]))
      for img, (h, w) in zip(x["image"], x["image_hw"]):
        assert 0 < h <= shape[0] and 0 < w <= shape[1] and max(h, w) == 64
        assert not img[h:].any() and not img[:, w:].any() and img[:h, :w].any()
  assert seen == set(BUCKETS)
  # Resuming at step 3 yields the uninterrupted batches.
  again = stream.make_train_iterator(
    c, b, seed=seed, start_step=3, process_index=1, process_count=2
  )
  its = [stream.make_train_iterator(c, b, seed=seed, process_index=1, process_count=2)]
  for _ in range(3):
    next(its[0])
  for _ in range(2):
    x, y = next(again), next(its[0])
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_sizes_of_older_builds_come_from_the_records(mixed_dir):
  builder = pipeline.get_builder(_data_config(mixed_dir))
  got = pipeline.sizes_from_records(builder, "train", chunk=3)
  np.testing.assert_array_equal(got, SIZES)
  np.testing.assert_array_equal(pipeline.record_sizes(builder, "train"), SIZES)


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_batches_by_orientation(mixed_dir, processes):
  """Every process has the same bucket at every batch; each image is evaluated once, in the
  bucket of its orientation; padding images are marked invalid."""
  c = _data_config(mixed_dir)
  c.eval_split = "train"  # 8 images of both orientations
  per_process = [
    list(pipeline.make_eval_iterator(c, 3, process_index=p, process_count=processes))
    for p in range(processes)
  ]
  assert len({len(batches) for batches in per_process}) == 1
  ids = []
  for batches in zip(*per_process):
    shape = batches[0]["image"].shape[1:3]
    assert shape in BUCKETS and all(x["image"].shape[1:3] == shape for x in batches)
    for x in batches:
      for orig, valid, image_id in zip(x["orig_hw"], x["valid"], x["image_id"]):
        assert (orig[1] > orig[0]) == (shape == BUCKETS[0])
        assert valid == (image_id >= 0)
        if valid:
          ids.append(int(image_id))
  assert sorted(ids) == list(range(1, len(SIZES) + 1))


def test_one_train_step_compilation_per_bucket(mixed_dir, tmp_path):
  """train_and_evaluate on the mixed set: the jitted step compiles once per bucket its steps
  use (here both), not once per step."""
  from configs import tiny_shapes  # pylint: disable=g-import-not-at-top
  from rethink_jax import train  # pylint: disable=g-import-not-at-top

  steps = 4
  c = tiny_shapes.get_config(str(steps))
  c.data = _data_config(mixed_dir)
  c.model.num_classes = 2
  c.eval_every = 0
  c.checkpoint.async_save = False
  c.seed = SEED % 1000
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  builder = pipeline.get_builder(c.data)
  pool = pipeline.train_pool(c.data, builder)
  plan = stream.make_step_plan(c.data, builder, pool, int(c.seed), int(c.batch_size))
  bucket_ids = preprocess.bucket_of(pipeline.record_sizes(builder, "train")[pool], BUCKETS)
  used = {int(bucket_ids[plan(s)[1][0]]) for s in range(steps)}
  assert out["step"] == steps
  assert out["train_step_compilations"] == len(used) == 2, (out["train_step_compilations"], used)


def test_coco_recipes_bucket_by_orientation():
  from configs import common  # pylint: disable=g-import-not-at-top

  for min_size in (800, (640, 672, 704, 736, 768, 800)):
    c = common.coco_mask_rcnn(min_size=min_size)
    assert tuple(map(tuple, c.data.pad_buckets)) == ((800, 1344), (1344, 800))
    assert c.model.backbone.norm_stats == "padded"
  # The buckets hold evaluation's 800 x 1333 when training uses smaller images.
  c = common.coco_mask_rcnn(min_size=640)
  assert tuple(map(tuple, c.data.pad_buckets)) == ((800, 1344), (1344, 800))
