"""The synthetic data with every network trained from scratch: the proxy's earlier recipe, kept to
compare against the pretrained one of configs/synthetic.py (docs: Table 1 in both regimes).

python -m cpal_jax.main --config=configs/synthetic_scratch.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic  # noqa: E402  (configs are loaded by file path, not as a package)


def get_config():
  c = synthetic.get_config()
  c.workdir = "runs/synthetic_scratch"
  c.model.pretrained = ""
  # Random init: layers 1-2 must train (SIPE's detach assumes pretrained features there), with
  # batch statistics (frozen BN at init is the identity and the net barely learns).
  c.model.detach_after = -1
  c.model.batch_norm = "train"
  # Every layer is new: one learning rate, and real momentum (the reference's 1e-4 only works on
  # top of pretrained features).
  c.train.momentum = 0.9
  c.train.head_lr_mult = 1.0
  # The boundary net's frozen backbone is random; its features still separate the regions.
  c.refine.irn.pretrained = ""
  # DeepLab-v2 from the trained CAM network's backbone (it saw image labels only), undilated as it
  # was trained, with batch statistics and the CAM recipe's clipped rate (README: variants).
  c.seg.pretrained = ""
  c.seg.init_from_cam = True
  c.seg.dilations = (1, 1, 1, 1)
  c.seg.batch_norm = "train"
  c.seg.lr = 0.1
  c.seg.clip_norm = 1.0
  c.seg.head_lr_mult = 1.0
  c.seg.head_bias_lr_mult = 2.0
  return c
