"""tfds builders (synthetic shapes, COCO instances) and the fixed-shape input pipeline."""
