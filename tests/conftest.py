"""Shared test set-up: CPU only, quiet TensorFlow, no network."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# TF must never grab the (absent) GPU nor compete with XLA for all cores.
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

# One persistent XLA compilation cache for the whole run, inherited by the subprocess tests
# (multi-device, multi-host): the tiny models compile to the same executables again and again,
# and XLA:CPU compilation dominates the suite's time. It lives in the checkout's .pytest_cache, so
# a fresh clone starts cold and measures the honest cost.
_CACHE_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  ".pytest_cache",
  "jax_compilation_cache",
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# The XLA:CPU flag the entry points set (rethink_jax.runtime), before any test starts JAX.
from rethink_jax import runtime  # noqa: E402

runtime.configure(hide_gpus_from_tf=False)

# Import order matters: importing torchvision AFTER tensorflow segfaults (their bundled native
# libraries clash); torchvision first is fine. The reference implementations are imported here,
# before any test module can pull in tensorflow.
try:
  import torch  # noqa: F401
  import torchvision  # noqa: F401
except ImportError:  # torch is a test-only dependency; tests that need it skip or fail there.
  pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A tfds data dir holding shapes_instances/tiny and shapes_classification/tiny, built once per
  pytest worker, offline. Tests read it and never write into it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  shapes.ShapesClassification(config="tiny", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope="session")
def keypoints_dir(tmp_path_factory):
  """A tfds data dir holding shapes_keypoints/tiny (64 x 64, 24 train / 8 validation images of
  stick figures with 7 keypoints), built once per pytest worker, offline. Read only."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import shapes_keypoints  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_keypoints"))
  shapes_keypoints.ShapesKeypoints(config="tiny", data_dir=data_dir).download_and_prepare()
  return data_dir
