"""A tiny Mask R-CNN (configs/tiny_shapes' model) with fresh random weights, saved as a detector
checkpoint: what the Predictor tests load."""

import numpy as np

from rethink_jax import detector_checkpoint

CLASS_NAMES = ["disc", "square", "triangle"]


def model_config():
  """tiny_shapes' model; canvas ladder 64, 96 (buckets 64x64, 64x96, 96x64, 96x96); every
  detection kept (random weights score every class about 1 / (K + 1))."""
  from configs import tiny_shapes  # pylint: disable=g-import-not-at-top

  c = tiny_shapes.tiny_model()
  c.input.update(min_size_test=64, max_size_test=96, size_divisibility=32)
  c.roi_heads.score_thresh_test = 0.0
  return c


def save(directory: str) -> tuple[str, dict, object, dict]:
  """Initialises model_config()'s model from a fresh seed (in meta) and saves it in directory:
  (directory, variables, model config, meta)."""
  import jax  # pylint: disable=g-import-not-at-top

  from rethink_jax.models import mask_rcnn  # pylint: disable=g-import-not-at-top

  config = model_config()
  model = mask_rcnn.build_model(config)
  batch = {"image": np.zeros((1, 64, 64, 3), np.float32), "image_hw": np.array([[64, 64]])}
  seed = int(np.random.default_rng().integers(1 << 31))
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  variables = jax.jit(lambda k: model.init({"params": k[0], "sampling": k[1]}, batch))(keys)
  meta = {"source": "test", "sha256": None, "class_names": CLASS_NAMES, "seed": seed}
  return (
    detector_checkpoint.save_detector(directory, variables, config, meta),
    variables,
    config,
    meta,
  )
