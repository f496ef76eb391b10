"""The train state pytree and the on-device image normalisation of the train and eval steps."""

from typing import Any

import flax.struct
import jax.numpy as jnp

from cpal_jax.models import resnet



@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any  # frozen BatchNorm statistics: restored and checkpointed, never updated
  opt_state: Any
  extra: Any  # method state (CPAL's support bank and centroids); {} for cam/sipe


def fresh(variables: dict, tx, extra: Any = None) -> TrainState:
  """Step 0 of a training stage: the variables, a new optimiser state and the method state."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
      extra={} if extra is None else extra,
  )


def normalize_images(image_u8: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> ImageNet-normalised float32, zero outside the valid region (equal to the
  reference's zero padding of the normalised crop)."""
  mean = jnp.asarray(resnet.IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(resnet.IMAGENET_STD, jnp.float32) * 255.0
  return (image_u8.astype(jnp.float32) - mean) / std * valid[..., None].astype(jnp.float32)
