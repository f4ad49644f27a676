"""Shared test set-up: CPU only, quiet TensorFlow, no network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# TF must never grab the (absent) GPU nor compete with XLA for all cores.
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
