"""The model config: every default of the Mask R-CNN modules, in one place."""

import ml_collections


def default_model_config() -> ml_collections.ConfigDict:
  """Detectron2's defaults with the paper's GN variant: R50-FPN-GN Mask R-CNN, 4conv1fc, COCO."""
  c = ml_collections.ConfigDict()
  c.num_classes = 80  # objects only; background is implicit
  c.dtype = "float32"  # "bfloat16": convs / matmuls in bf16, norms, losses and boxes in f32
  c.mask_on = True  # False: no mask head (no params, no loss_mask, no "masks" output)
  c.keypoint_on = False  # True: the keypoint head (Keypoint R-CNN); needs gt_keypoints to train

  c.backbone = ml_collections.ConfigDict(
    dict(
      depth=50,
      norm="GN",
      num_groups=32,
      stride_in_1x1=False,
      freeze_at=0,
      width=64,
      bn_group_size=0,
      groups=1,  # of the bottleneck 3x3 convs: ResNeXt's cardinality (X-101-32x8d: 32)
      width_per_group=64,  # res2's channels per group at width 64 (64: ResNet; X-101-32x8d: 8)
      norm_stats="padded",
    )
  )  # bn_group_size 0: BN statistics over the whole batch
  # norm_stats: the region of the backbone's and FPN's GroupNorm statistics. "padded" (Detectron2:
  # the whole padded input tensor; the COCO recipes, whose orientation buckets pad about as much
  # as Detectron2's batches) or "valid" (each image's image_hw region only, zeros outside it:
  # features independent of the padding). The heads' GN sees ROI features, never padding.
  # The FPN's GN uses backbone.num_groups and norm_stats, and its BN backbone.bn_group_size.
  c.fpn = ml_collections.ConfigDict(dict(out_channels=256, norm="GN"))
  c.anchors = ml_collections.ConfigDict(
    dict(
      sizes=((32,), (64,), (128,), (256,), (512,)),
      aspect_ratios=(0.5, 1.0, 2.0),
      offset=0.0,
      # torchvision rounds its cell anchors to integers; Detectron2 does not.
      round_cell=False,
      # True: stride of a level = padded image size // feature size per axis (torchvision: P6 of
      # an 800-row input has stride 61); False: 4, 8, 16, 32, 64 (Detectron2).
      grid_strides=False,
    )
  )
  c.rpn = ml_collections.ConfigDict(
    dict(
      head_conv_dims=-1,
      head_num_conv=1,  # shared 3x3 convs of the RPN head (torchvision's v2: 2)
      pre_nms_topk_train=2000,
      pre_nms_topk_test=1000,
      post_nms_topk_train=1000,
      post_nms_topk_test=1000,
      nms_thresh=0.7,
      min_size=0.0,
      # Proposals kept: w, h > min_size (Detectron2); True: w, h >= min_size (torchvision, 1e-3).
      min_size_inclusive=False,
      iou_thresholds=(0.3, 0.7),
      iou_labels=(0, -1, 1),
      batch_size_per_image=256,
      positive_fraction=0.5,
      bbox_reg_weights=(1.0, 1.0, 1.0, 1.0),
      smooth_l1_beta=0.0,
      loss_weight=1.0,
    )
  )
  c.roi_heads = ml_collections.ConfigDict(
    dict(
      batch_size_per_image=512,
      positive_fraction=0.25,
      iou_threshold=0.5,
      bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
      score_thresh_test=0.05,
      nms_thresh_test=0.5,
      detections_per_image=100,
      proposal_append_gt=True,
      # Fixed-shape inference: the best (proposal, class) candidates above the score threshold
      # that enter the per-class NMS (Detectron2 keeps all of them; exact when fewer pass).
      test_candidates=2000,
      # Detections need w, h >= this after clipping (torchvision 1e-2; Detectron2 none: 0).
      min_box_size_test=0.0,
      # "standard" (StandardROIHeads) or "cascade" (CascadeROIHeads, models/cascade_roi_heads.py).
      name="standard",
      # Cascade: each stage's foreground IoU (the first is iou_threshold) and box weights.
      cascade_iou_thresholds=(0.5, 0.6, 0.7),
      cascade_bbox_reg_weights=(
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
      ),
    )
  )
  # Head norms: GN with num_groups groups; BN / SyncBN take statistics over all ROIs of the batch.
  c.box_head = ml_collections.ConfigDict(
    dict(
      name="4conv1fc",
      num_conv=4,
      conv_dim=256,
      num_fc=1,
      fc_dim=1024,
      norm="GN",
      num_groups=32,
      pooler_resolution=7,
      pooler_sampling_ratio=0,
      pooler_aligned=True,
      # Static cap of the adaptive grid (sampling_ratio 0): exact for ROIs whose side on their
      # level is at most cap * resolution cells (Detectron2 has no cap; see ops/roi_align.py).
      pooler_max_sampling_ratio=4,
      # Level of a box: "detectron2" floor(4 + log2(s/224 + 1e-8)), "torchvision" +1e-6 outside.
      pooler_level_rule="detectron2",
    )
  )
  c.mask_head = ml_collections.ConfigDict(
    dict(
      num_conv=4,
      conv_dim=256,
      norm="GN",
      num_groups=32,
      pooler_resolution=14,
      pooler_sampling_ratio=0,
      pooler_aligned=True,
      pooler_max_sampling_ratio=4,  # as box_head's
      pooler_level_rule="detectron2",  # as box_head's
      # Training targets from gt_masks: "crop" (B, G, S, S) crops to each instance's box
      # (ops/masks.py mask_targets, this pipeline's); "full_image" (B, G, H, W) bitmaps of the
      # padded batch, RoIAlign of the whole mask at the ROI (Detectron2's rule).
      target_rule="crop",
      max_fg_rois=128,
      resolution=28,
      # The mask branch runs in chunks of this many ROIs per image and skips chunks that hold no
      # ROI (foreground in training, detection in inference) in any image; 0 = one pass.
      chunk_rois=16,
    )
  )
  # Detectron2's ROI_KEYPOINT_HEAD (KRCNNConvDeconvUpsampleHead), read when keypoint_on.
  c.keypoint_head = ml_collections.ConfigDict(
    dict(
      num_keypoints=17,  # K (COCO person)
      conv_dims=(512,) * 8,  # 3x3 convs with bias + ReLU, no norm
      pooler_resolution=14,  # heatmaps are 4x this: 56 x 56
      pooler_sampling_ratio=0,
      pooler_aligned=True,
      pooler_max_sampling_ratio=4,  # as box_head's
      pooler_level_rule="detectron2",  # as box_head's
      # Foreground ROIs per image the head trains on (those with a visible keypoint inside),
      # static, with a validity mask; 128 = 512 * 0.25 holds every one Detectron2 samples.
      max_fg_rois=128,
      loss_weight=1.0,
      # True: loss / number of visible in-ROI keypoints in the batch; False: / (num_images *
      # num_keypoints * roi_heads.batch_size_per_image * roi_heads.positive_fraction).
      normalize_by_visible_keypoints=True,
      # Training images need at least this many visible keypoints (a data filter, Detectron2's).
      min_keypoints_per_image=1,
      # Inference resizes each heatmap to its box on a static resize_cap x resize_cap grid:
      # exact for box sides <= resize_cap pixels, coarse-to-fine above (ops/keypoints.py).
      resize_cap=64,
      chunk_rois=16,  # as mask_head's: the branch runs in chunks that skip empty ones
    )
  )
  # How images enter and detections leave a converted or trained detector (rethink_jax.predict;
  # training takes its own from the data config). Detectron2's defaults.
  c.input = ml_collections.ConfigDict(
    dict(
      format="BGR",  # channel order the model was trained on
      pixel_mean=(103.53, 116.28, 123.675),  # 0..255, in `format` order
      pixel_std=(1.0, 1.0, 1.0),
      min_size_test=800,  # shorter side after resizing
      max_size_test=1333,  # longer side at most
      # "detectron2": PIL bilinear on uint8; "torchvision": on floats; "rethink_jax": the pipeline
      resize="detectron2",
      size_divisibility=32,  # padded height and width are multiples of this
    )
  )
  c.output = ml_collections.ConfigDict(
    dict(
      # A detection of class k (1..K) reports label k - 1 + first_label: Detectron2 0..K-1,
      # torchvision 1..K (its background 0). The model itself keeps background last.
      first_label=0,
      mask_paste="detectron2",  # "detectron2" (grid sample) or "torchvision" (1-pixel border)
    )
  )
  return c
