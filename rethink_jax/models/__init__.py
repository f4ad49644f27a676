"""Flax modules of Mask R-CNN with a ResNet-FPN backbone (Detectron2 architecture and names)."""
