"""Session-scoped synthetic data sets for the data tests (built once, offline, in a temp dir)."""

import pytest


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A tfds data dir holding shapes_instances/tiny and shapes_classification/tiny."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
  shapes.ShapesInstances(config="tiny", data_dir=data_dir).download_and_prepare()
  shapes.ShapesClassification(config="tiny", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture()
def tiny_config(shapes_dir):
  """config.data for shapes_instances/tiny at 64 x 64 (fresh copy per test)."""
  from rethink_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  c = pipeline.default_data_config()
  c.data_dir = shapes_dir
  c.builder_config = "tiny"
  c.min_size = 64
  c.max_size = 64
  c.pad_to = (64, 64)
  c.mask_size = 28
  c.max_instances = 8
  return c
