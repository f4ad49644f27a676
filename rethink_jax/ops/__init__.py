"""Pure, static-shape detection ops (no parameters): boxes, anchors, matching, sampling, nms,
roi_align, masks. Every function runs under jax.jit and jax.vmap; import the submodules."""
