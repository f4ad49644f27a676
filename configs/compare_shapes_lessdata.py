r"""The demo's comparison with less detection data (the paper's section 5): both arms on the same
small subset of shapes_instances/demo's 1,600 training images.

  python -m rethink_jax.compare --config configs/compare_shapes_lessdata.py:10pct \
      --workdir runs/compare_10pct
  python -m rethink_jax.compare --config configs/compare_shapes_lessdata.py:1pct \
      --workdir runs/compare_1pct

FRACTION (the config argument): "10pct" = 160 images (the paper's 10k of COCO's 118k), "1pct" =
16 images (the paper's 1k); a plain number is that many images. Everything else is
configs/compare_shapes.py: the same model, hyper-parameters (the paper tunes them on the
pre-trained arm and reuses them from scratch; here both arms share one config), the same
pre-training set and settings, the same 200 validation images, and `compare.train_images` picks
the subset with a seed derived from `seed` (the same images for both arms and every seed).

Schedule rule: the iteration counts stay the full-data demo's (1x = 400 iterations at batch 4,
both arms to 6x, evaluated at 1x, 2x, 3x, 4x, 6x), as the paper keeps full-data iteration counts
for its subsets (10k images: pre-trained best at 60k iterations, random init at 220k; i.e. about
100 and 350 epochs where COCO's 1x is 12). So 1x is 10 epochs of the 10% subset and 100 epochs
of the 1% one: the curves show where each arm peaks and whether it overfits, and a run costs the
same as the demo.

Paper (COCO, box AP): 10k images: pre-trained 26.0 vs random init 25.9; 1k images: 9.9 vs 3.5.
"""

import ml_collections

from configs import compare_shapes

# Training images of shapes_instances/demo (the demo's full set).
DEMO_TRAIN_IMAGES = 1600
FRACTIONS = {"10pct": 0.10, "1pct": 0.01}


def train_images(fraction: str) -> int:
  """Images of a FRACTION argument ("10pct", "1pct" or a number of images)."""
  if fraction in FRACTIONS:
    return int(round(FRACTIONS[fraction] * DEMO_TRAIN_IMAGES))
  if fraction.isdigit() and int(fraction) > 0:
    return int(fraction)
  raise ValueError(f"FRACTION must be one of {sorted(FRACTIONS)} or a number, got {fraction!r}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = compare_shapes.get_config()
  c.compare.train_images = train_images(arg or "10pct")
  return c
