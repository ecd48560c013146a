"""Small stand-ins for the parts of DINO, iBOT, DINOv2 and DINOv3 that the integrations touch.

facebookresearch/dino, bytedance/ibot, facebookresearch/dinov2 and facebookresearch/dinov3 are
repositories, not packages, so the tests cannot import them. These modules are written here from their
public interfaces (read in the repositories, not copied): the constructor arguments, attribute and
parameter names of the heads and losses, the forward signatures, the layout of the checkpoints, and the
call pattern of one training step (teacher forward, student forward, loss, backward,
``cancel_gradients_last_layer``, optimizer step, EMA update of the teacher). The backbones are tiny:
what matters is everything around them.
"""
