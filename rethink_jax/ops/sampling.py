"""Balanced positive / negative sampling (Detectron2's subsample_labels) at a static size."""

import jax
import jax.numpy as jnp


def sample_balanced(
  labels: jax.typing.ArrayLike, num_samples: int, positive_fraction: float, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Randomly pick up to `num_samples` entries, at most a `positive_fraction` of them positive.

  num_pos = min(#positives, int(num_samples * positive_fraction)),
  num_neg = min(#negatives, num_samples - num_pos); each drawn uniformly without replacement
  among its candidates (top-k of iid uniform scores restricted to the candidates).
  Ignored entries (-1) are never drawn.

  The output has S = min(num_samples, N) slots: a request above the candidate count (Detectron2
  configs that sample every labeled entry) costs N rows, not num_samples.

  Args:
    labels: (N,) int, 1 positive, 0 negative, -1 ignore.
    num_samples: static int >= 1.
    positive_fraction: static float in [0, 1].
    key: jax.random key.

  Returns:
    indices: (S,) int32; the num_pos positives first, then the num_neg negatives,
      then invalid slots holding index 0 (safe to gather; mask them with `valid`).
    valid: (S,) bool.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (N,), got {labels.shape}")
  n = labels.shape[0]
  num_samples = int(num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  is_pos = labels == 1
  is_neg = labels == 0
  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(jnp.sum(is_pos), max_pos).astype(jnp.int32)
  num_neg = jnp.minimum(jnp.sum(is_neg), num_samples - num_pos).astype(jnp.int32)

  slots = min(num_samples, n)  # num_pos + num_neg <= n
  scores = jax.random.uniform(key, (n,), jnp.float32)
  # Candidates score in [0, 1), the rest -1: the top entries are a uniform random subset.
  _, pos_idx = jax.lax.top_k(jnp.where(is_pos, scores, -1.0), slots)
  _, neg_idx = jax.lax.top_k(jnp.where(is_neg, scores, -1.0), slots)

  slot = jnp.arange(slots, dtype=jnp.int32)
  neg_slot = jnp.clip(slot - num_pos, 0, slots - 1)
  indices = jnp.where(slot < num_pos, pos_idx, neg_idx[neg_slot])
  valid = slot < num_pos + num_neg
  return jnp.where(valid, indices, 0).astype(jnp.int32), valid
