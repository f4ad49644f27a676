"""The data tests' config of shapes_instances/tiny (the data set itself: tests/conftest.py)."""

import pytest


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
