import jax
import numpy as np
import pytest

from rethink_jax.ops.sampling import sample_balanced


@pytest.mark.parametrize("num_samples,fraction", [(16, 0.5), (32, 0.25)])
def test_sample_balanced_counts_and_candidates(rng, num_samples, fraction):
  n, batch = 60, 6
  labels = rng.choice([-1, 0, 1], size=(batch, n), p=[0.3, 0.5, 0.2]).astype(np.int32)
  labels[1] = np.where(labels[1] == 1, 0, labels[1])  # no positives
  labels[2] = np.where(labels[2] == 0, 1, labels[2])  # no negatives
  labels[3, :] = -1  # nothing to sample
  labels[4, :] = 1
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), batch)
  fn = jax.jit(jax.vmap(lambda l, k: sample_balanced(l, num_samples, fraction, k)))
  idx, valid = map(np.asarray, fn(labels, keys))
  for b in range(batch):
    npos = min((labels[b] == 1).sum(), int(num_samples * fraction))
    nneg = min((labels[b] == 0).sum(), num_samples - npos)
    assert valid[b].sum() == npos + nneg
    assert valid[b, : npos + nneg].all()
    chosen = idx[b][valid[b]]
    assert len(set(chosen.tolist())) == len(chosen)  # without replacement
    np.testing.assert_array_equal(labels[b][chosen[:npos]], 1)
    np.testing.assert_array_equal(labels[b][chosen[npos:]], 0)
    assert (idx[b][~valid[b]] == 0).all()


def test_sample_balanced_is_uniform(rng):
  n, trials = 40, 2000
  labels = np.zeros(n, np.int32)
  labels[:10] = 1
  labels[30:] = -1
  keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), trials)
  idx, valid = jax.jit(jax.vmap(lambda k: sample_balanced(labels, 8, 0.25, k)))(keys)
  counts = np.bincount(np.asarray(idx)[np.asarray(valid)], minlength=n)
  # Each positive is drawn with probability 2/10, each negative 6/20.
  np.testing.assert_allclose(counts[:10] / trials, 0.2, atol=0.05)
  np.testing.assert_allclose(counts[10:30] / trials, 0.3, atol=0.05)
  assert counts[30:].sum() == 0


def test_sample_balanced_caps_its_size_at_the_candidate_count(rng):
  # Detectron2 configs that sample every labeled entry ask for more than there are.
  labels = rng.choice([-1, 0, 1], size=50, p=[0.2, 0.5, 0.3]).astype(np.int32)
  idx, valid = sample_balanced(labels, 1_000_000, 0.5, jax.random.key(int(rng.integers(2**31))))
  assert idx.shape == valid.shape == (50,)
  assert int(valid.sum()) == int((labels >= 0).sum())
  assert sorted(np.asarray(idx)[np.asarray(valid)]) == sorted(np.flatnonzero(labels >= 0))


def test_sample_balanced_shape_error():
  with pytest.raises(ValueError, match=r"\(2, 3\)"):
    sample_balanced(np.zeros((2, 3), np.int32), 2, 0.5, jax.random.key(0))
