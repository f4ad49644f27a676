"""Flax modules of Mask R-CNN with a ResNet-FPN backbone (Detectron2 architecture and names)."""

from rethink_jax.models.config import default_model_config  # noqa: E402
from rethink_jax.models.fpn import FPN  # noqa: E402
from rethink_jax.models.fpn import build_resnet_fpn  # noqa: E402
from rethink_jax.models.layers import Conv2d  # noqa: E402
from rethink_jax.models.layers import build_norm  # noqa: E402
from rethink_jax.models.mask_rcnn import MaskRCNN  # noqa: E402
from rethink_jax.models.mask_rcnn import build_model  # noqa: E402
from rethink_jax.models.resnet import ResNet  # noqa: E402
from rethink_jax.models.resnet import build_resnet  # noqa: E402
from rethink_jax.models.resnet import frozen_param_prefixes  # noqa: E402
