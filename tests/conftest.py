"""Shared test set-up: CPU only, quiet TensorFlow, no network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# TF must never grab the (absent) GPU nor compete with XLA for all cores.
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

# Import order matters: importing torchvision AFTER tensorflow segfaults (their bundled native
# libraries clash); torchvision first is fine. The reference implementations are imported here,
# before any test module can pull in tensorflow.
try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # torch is a test-only dependency; tests that need it skip or fail there.
    pass
