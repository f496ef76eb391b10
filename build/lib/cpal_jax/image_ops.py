"""Resizing with PyTorch's `F.interpolate` semantics (NHWC), so ported formulas give the same maps.

`jax.image.resize` antialiases when downsampling and its 'nearest' samples at pixel centres; the
reference code uses neither, so these helpers pin down the exact sampling grids.
"""

import jax
import jax.numpy as jnp
import numpy as np


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """`F.interpolate(mode='bilinear', align_corners=False)` on [N, H, W, C]."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="linear", antialias=False)


def _axis_weights_align_corners(n_in: int, n_out: int) -> jnp.ndarray:
  """[n_out, n_in] interpolation matrix for align_corners=True along one axis."""
  if n_out == 1 or n_in == 1:
    pos = jnp.zeros((n_out,))
  else:
    pos = jnp.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
  hi = jnp.clip(lo + 1, 0, n_in - 1)
  frac = pos - lo
  return jax.nn.one_hot(lo, n_in) * (1 - frac)[:, None] + jax.nn.one_hot(hi, n_in) * frac[:, None]


def resize_bilinear_align_corners(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """`F.interpolate(mode='bilinear', align_corners=True)` on [N, H, W, C]."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  wy = _axis_weights_align_corners(x.shape[1], size[0]).astype(x.dtype)
  wx = _axis_weights_align_corners(x.shape[2], size[1]).astype(x.dtype)
  return jnp.einsum("yh,nhwc,xw->nyxc", wy, x, wx)


def resize_nearest(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """`F.interpolate(mode='nearest')` on [N, H, W, ...].

  torch computes the source index as floor(dst * (float(in) / out)) in float32, with exact paths for
  equal and doubled sizes; the float32 rounding matters (26 -> 22 picks row 12 at dst 11, not 13).
  """

  def index(n_in: int, n_out: int) -> jnp.ndarray:
    if n_out == n_in:
      return jnp.arange(n_out)
    if n_out == 2 * n_in:
      return jnp.arange(n_out) // 2
    scale = np.float32(n_in) / np.float32(n_out)  # float32 division, as torch
    src = jnp.floor(jnp.arange(n_out, dtype=jnp.float32) * scale).astype(jnp.int32)
    return jnp.minimum(src, n_in - 1)

  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  return x[:, index(h, size[0])][:, :, index(w, size[1])]


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 weights of `F.interpolate(mode='bilinear', align_corners=False)` along
  one axis (torch clamps source positions below 0, and uses in/out as the scale)."""
  scale = n_in / n_out
  src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear_host(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Host (numpy) bilinear resize of [K, H, W] maps, align_corners=False.

  Per-image map sizes vary on real data; on the host they cost no compilation per size.
  """
  h, w = x.shape[-2:]
  if (h, w) == tuple(size):
    return np.asarray(x, np.float32)
  return np.einsum(
      "yh,khw,xw->kyx", bilinear_matrix(h, size[0]), x, bilinear_matrix(w, size[1]), optimize=True
  )
