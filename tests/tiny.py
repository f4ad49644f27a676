"""The tiny training run many tests share: configs/tiny_shapes.py on shapes_instances/tiny.

Tests that use `train_config` with the same shapes compile the same train step, which the
persistent XLA cache (tests/conftest.py) then serves to every other module and subprocess.
"""

import ml_collections

from configs import tiny_shapes


def train_config(data_dir: str | None, steps: int, **overrides) -> ml_collections.ConfigDict:
  """configs/tiny_shapes.py for `steps` iterations on the tfds dir `data_dir`, no evaluation.

  overrides: flattened keys ("eval.at_end": True) applied last.
  """
  c = tiny_shapes.get_config(str(steps))
  c.data.data_dir = data_dir
  c.data.num_parallel_calls = 1
  c.schedule.decay_steps = (3,)  # the same LR at every step of these short runs, whatever steps
  c.eval_every = 0
  c.eval.at_end = False
  c.update_from_flattened_dict(overrides)
  return c
