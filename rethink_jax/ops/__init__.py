"""Pure, static-shape detection ops (no parameters): boxes, anchors, matching, sampling, nms,
roi_align, masks. Every function runs under jax.jit and jax.vmap."""

from rethink_jax.ops.anchors import generate_anchors
from rethink_jax.ops.boxes import box_area, box_iou, clip_boxes, decode_boxes, encode_boxes
from rethink_jax.ops.matching import match
from rethink_jax.ops.nms import batched_nms, nms
from rethink_jax.ops.sampling import sample_balanced
from rethink_jax.ops.roi_align import assign_levels, multilevel_roi_align, roi_align
from rethink_jax.ops.masks import crop_masks_to_boxes, mask_targets, paste_masks
