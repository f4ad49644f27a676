"""Shared helpers for the ops tests: fresh seeds (printed on failure) and random boxes."""

import os
import time

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  seed = int(os.environ.get("RETHINK_TEST_SEED", time.time_ns() % 2**32))  # set to reproduce
  print(f"seed={seed}")  # shown by pytest on failure
  return np.random.default_rng(seed)


def random_boxes(rng, n, size=100.0, min_wh=1.0, max_wh=None, dtype=np.float32):
  """(n, 4) xyxy boxes with corners in roughly [0, size]."""
  max_wh = size / 2 if max_wh is None else max_wh
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(dtype)
