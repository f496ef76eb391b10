"""Backbone pretraining on ProcNet, the CPU proxy's ImageNet (cpal_jax/data/procnet.py).

python -m cpal_jax.pretrain --config=configs/pretrain.py

writes the weights that configs/synthetic.py starts every network from
(cpal_jax/assets/procnet_resnet_tiny.npz, committed; this command regenerates it).
"""

import os

import ml_collections

import cpal_jax

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(cpal_jax.__file__)), "assets")


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/pretrain"
  c.out = os.path.join(_ASSETS, "procnet_resnet_tiny.npz")
  c.data = ml_collections.ConfigDict()
  c.data.image_size = 64
  c.data.num_train = 0  # 0: ProcNet's 60,000 training images
  c.data.num_val = 0  # 0: its 2,000 validation images
  c.data.workers = 0
  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet_tiny"
  c.model.strides = (2, 2, 2, 2)  # output stride 32, as ImageNet classifiers train
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.epochs = 4
  c.train.num_steps = 0
  c.train.crop_size = 64
  c.train.resize_long = (56, 80)  # scale jitter, then a 64 px crop (zero-padded when smaller)
  c.train.lr = 0.1
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-5
  c.train.poly_power = 0.9
  c.train.clip_norm = 5.0
  c.train.label_smoothing = 0.1
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.train.ckpt_keep = 2
  c.train.nonfinite = "stop"
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 100
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  return c
