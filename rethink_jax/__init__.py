"""rethink_jax: Mask R-CNN with ResNet-FPN-GN in JAX/Flax, trained from scratch or fine-tuned.

A reimplementation of "Rethinking ImageNet Pre-training" (He, Girshick, Dollar, ICCV 2019).
Subpackages: ops (pure detection ops), models (Flax modules), data (tfds builders and the input
pipeline); modules: train, evaluate, optim, convert, compare.

Importing the package changes nothing in the process; entry points call
`rethink_jax.runtime.configure()` for the XLA:CPU flag and TensorFlow's device set-up.
"""
