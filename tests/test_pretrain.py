"""Tests of rethink_jax.pretrain: a tiny pre-training run learns, and its backbone checkpoint
round-trips through rethink_jax.convert.load_backbone into the detector's ResNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rethink_jax import convert
from rethink_jax import pretrain


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pretrain")
  c = pretrain.default_pretrain_config()
  c.data.data_dir = str(tmp / "tfds")
  c.data.builder_config = "tiny"
  # 32x32 images so a few dozen steps run in seconds; 4 categories so the task is learnable.
  c.data.builder_overrides = {
    "num_train": 256,
    "num_validation": 32,
    "image_size": 32,
    "num_categories": 4,
  }
  c.data.image_size = 32
  c.model.update(depth=18, width=8, num_groups=4, norm="GN")
  c.batch_size = 16
  c.steps = 300
  c.warmup_steps = 10
  c.base_lr = 0.02
  c.log_every = 30
  meta = pretrain.pretrain(c, str(tmp / "run"))
  return c, meta, str(tmp / "run" / "backbone")


def test_tiny_pretraining_learns(tiny_run):
  _, meta, _ = tiny_run
  hist = meta["train_history"]
  assert len(hist) == 10
  chance = 100.0 / meta["num_classes"]
  # Training loss falls and the last training accuracy is well above chance.
  assert np.mean([h["loss"] for h in hist[-2:]]) < 0.9 * hist[0]["loss"], hist
  assert np.mean([h["accuracy"] for h in hist[-2:]]) > chance + 10, (hist, chance)
  assert 0.0 <= meta["top1"] <= 100.0


def test_checkpoint_round_trips_into_the_detector_resnet(tiny_run):
  c, meta, path = tiny_run
  variables, loaded = convert.load_backbone(path)
  for key in (
    "depth",
    "norm",
    "stride_in_1x1",
    "width",
    "pixel_mean",
    "pixel_std",
    "input_format",
    "sha256",
    "top1",
  ):
    assert loaded[key] == meta[key], key
  assert loaded["source"] == "pretrain:shapes_classification"
  assert loaded["sha256"] is None
  # The saved tree is exactly the ResNet's: the detector's backbone accepts it as is.
  from rethink_jax.models import resnet  # pylint: disable=g-import-not-at-top

  net = resnet.build_resnet(
    depth=c.model.depth,
    norm=c.model.norm,
    num_groups=c.model.num_groups,
    width=c.model.width,
    stride_in_1x1=c.model.stride_in_1x1,
  )
  x = jnp.asarray(np.random.default_rng().normal(size=(2, 32, 32, 3)), jnp.float32)
  fresh = net.init(jax.random.PRNGKey(0), x)
  shapes = lambda t: jax.tree_util.tree_map(lambda a: a.shape, t)
  assert shapes(fresh["params"]) == shapes(variables["params"])
  out = net.apply({"params": variables["params"]}, x)
  assert set(out) == {"res2", "res3", "res4", "res5"}
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  # Loaded weights are the trained ones, not a fresh init.
  a = jax.tree_util.tree_leaves(variables["params"])
  b = jax.tree_util.tree_leaves(fresh["params"])
  assert any(not np.allclose(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))


def test_classifier_rejects_bad_shapes():
  m = pretrain.Classifier(num_classes=3, depth=18, width=8, num_groups=4)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32)), train=False)


def test_pretrain_config_follows_the_detector():
  import ml_collections  # pylint: disable=g-import-not-at-top

  det = ml_collections.ConfigDict(
    {
      "model": {
        "backbone": {
          "depth": 50,
          "norm": "SyncBN",
          "num_groups": 32,
          "stride_in_1x1": True,
          "width": 16,
          "bn_group_size": 0,
        }
      },
      "data": {
        "pixel_mean": (1.0, 2.0, 3.0),
        "pixel_std": (4.0, 5.0, 6.0),
        "input_format": "BGR",
        "data_dir": "/x",
      },
      "compare": {"pretrain": {"steps": 7, "data": {"image_size": 48}}},
    }
  )
  c = pretrain.pretrain_config(det)
  assert (c.model.depth, c.model.norm, c.model.stride_in_1x1, c.model.width) == (
    50,
    "SyncBN",
    True,
    16,
  )
  assert tuple(c.data.pixel_mean) == (1.0, 2.0, 3.0) and c.data.input_format == "BGR"
  assert c.steps == 7 and c.data.image_size == 48 and c.data.data_dir == "/x"
