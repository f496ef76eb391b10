"""image_ops resizes against plain-numpy transcriptions of torch's F.interpolate sampling grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpal_jax import image_ops


def bilinear_matrix(n_in, n_out, align_corners):
  """[n_out, n_in] weights of torch's 2-tap bilinear along one axis (UpSample.h)."""
  m = np.zeros((n_out, n_in))
  for d in range(n_out):
    if align_corners:
      # torch: scale = (in-1)/(out-1), and 0 when out == 1.
      src = 0.0 if n_out == 1 else d * (n_in - 1) / (n_out - 1)
    else:
      # torch clamps negative source coordinates to 0 (only the left/top edge is clamped; the
      # right edge is handled by hi = min(lo + 1, in - 1)).
      src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = min(int(np.floor(src)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    frac = src - lo
    m[d, lo] += 1 - frac
    m[d, hi] += frac
  return m


def np_bilinear(x, size, align_corners):
  my = bilinear_matrix(x.shape[1], size[0], align_corners)
  mx = bilinear_matrix(x.shape[2], size[1], align_corners)
  return np.einsum("yh,nhwc,xw->nyxc", my, x.astype(np.float64), mx)


def torch_nearest_index(n_in, n_out):
  """torch's legacy 'nearest' source index, including its float32 arithmetic:
  min(floorf(dst * (float)in/out), in-1), with exact shortcuts for out == in and out == 2*in."""
  if n_out == n_in:
    return np.arange(n_out)
  if n_out == 2 * n_in:
    return np.arange(n_out) >> 1
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out).astype(np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def exact_nearest_index(n_in, n_out):
  return np.array([int(np.floor(d * n_in / n_out)) for d in range(n_out)])


def np_nearest(x, size, index_fn=torch_nearest_index):
  iy = index_fn(x.shape[1], size[0])
  ix = index_fn(x.shape[2], size[1])
  return x[:, iy][:, :, ix]


def rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# (in_hw, out_hw): non-integer up/down ratios, exact 4x down, identity, mixed per axis, 1-pixel edges.
SIZES = [
    ((7, 7), (12, 12)),
    ((12, 12), (5, 5)),
    ((32, 32), (8, 8)),
    ((5, 5), (5, 5)),
    ((7, 12), (12, 5)),
    ((13, 6), (4, 17)),
    ((1, 4), (3, 1)),
    ((4, 1), (1, 5)),
]


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_bilinear_matches_torch_grid(in_hw, out_hw):
  x = rand((2, *in_hw, 3), seed=sum(in_hw) + 7 * sum(out_hw))
  got = image_ops.resize_bilinear(jnp.asarray(x), out_hw)
  assert got.shape == (2, *out_hw, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np_bilinear(x, out_hw, False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_bilinear_align_corners_matches_torch_grid(in_hw, out_hw):
  x = rand((2, *in_hw, 3), seed=1 + sum(in_hw) + 7 * sum(out_hw))
  got = image_ops.resize_bilinear_align_corners(jnp.asarray(x), out_hw)
  assert got.shape == (2, *out_hw, 3) and got.dtype == jnp.float32
  # atol: float32 source coordinates up to ~30 carry ~2e-6 error, times neighbour gaps of ~3
  # (torch's own float32 grid has the same error).
  np.testing.assert_allclose(np.asarray(got), np_bilinear(x, out_hw, True), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_nearest_matches_torch_grid(in_hw, out_hw):
  x = rand((2, *in_hw, 3), seed=2 + sum(in_hw) + 7 * sum(out_hw))
  got = image_ops.resize_nearest(jnp.asarray(x), out_hw)
  np.testing.assert_array_equal(np.asarray(got), np_nearest(x, out_hw))


def test_bilinear_downsample_is_two_tap_not_antialiased():
  # 32 -> 8: torch samples at 4d + 1.5, i.e. the mean of rows 4d+1 and 4d+2 only. An antialiased
  # resize (jax.image.resize's default) would average over a wider window.
  x = rand((1, 32, 1, 1), seed=3)
  got = np.asarray(image_ops.resize_bilinear(jnp.asarray(x), (8, 1)))[0, :, 0, 0]
  want = 0.5 * (x[0, 1::4, 0, 0] + x[0, 2::4, 0, 0])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  antialiased = np.asarray(jax.image.resize(jnp.asarray(x), (1, 8, 1, 1), "linear"))[0, :, 0, 0]
  assert not np.allclose(antialiased, want, atol=1e-3)


def test_bilinear_upsample_edges_clamp():
  # align_corners=False with 7 -> 12: the first output samples at -0.21 (clamped to row 0) and
  # the last at 6.21 (beyond the last row): both copy the edge row exactly.
  x = rand((1, 7, 7, 2), seed=4)
  got = np.asarray(image_ops.resize_bilinear(jnp.asarray(x), (12, 12)))
  np.testing.assert_allclose(got[0, 0, 0], x[0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(got[0, -1, -1], x[0, -1, -1], rtol=1e-6)


def test_align_corners_keeps_corners():
  x = rand((2, 6, 9, 3), seed=5)
  got = np.asarray(image_ops.resize_bilinear_align_corners(jnp.asarray(x), (11, 4)))
  for yi, yo in ((0, 0), (-1, -1)):
    for xi, xo in ((0, 0), (-1, -1)):
      np.testing.assert_allclose(got[:, yo, xo], x[:, yi, xi], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "fn", [image_ops.resize_bilinear, image_ops.resize_bilinear_align_corners, image_ops.resize_nearest]
)
def test_same_size_is_identity(fn):
  x = jnp.asarray(rand((2, 5, 7, 3), seed=6))
  np.testing.assert_array_equal(np.asarray(fn(x, (5, 7))), np.asarray(x))


def test_nearest_keeps_dtype_and_takes_rank3():
  # The valid mask is resized as [B, H, W] uint8/bool in places: indexing must not cast or need C.
  x = (np.random.default_rng(7).random((2, 9, 11)) > 0.5).astype(np.uint8)
  got = image_ops.resize_nearest(jnp.asarray(x), (4, 6))
  assert got.dtype == jnp.uint8 and got.shape == (2, 4, 6)
  np.testing.assert_array_equal(np.asarray(got), np_nearest(x, (4, 6)))


def test_resizes_jit():
  x = jnp.asarray(rand((1, 7, 12, 2), seed=8))
  for fn in (image_ops.resize_bilinear, image_ops.resize_bilinear_align_corners, image_ops.resize_nearest):
    np.testing.assert_allclose(
        np.asarray(jax.jit(fn, static_argnums=1)(x, (12, 5))),
        np.asarray(fn(x, (12, 5))),
        rtol=1e-6,
        atol=1e-6,
    )


def test_nearest_stride16_sizes_agree_with_torch():
  # The valid mask is resized from each image side to its ResNet stride-16 size (four
  # ceil-halvings). For every side 64..512 the exact integer floor (what resize_nearest computes,
  # checked on a few of them) equals torch's float32 floor, so the discrepancy in the xfail test
  # below did not reach the pipeline either.
  for n_in in range(64, 513):
    n_out = n_in
    for _ in range(4):
      n_out = -(-n_out // 2)
    np.testing.assert_array_equal(
        exact_nearest_index(n_in, n_out), torch_nearest_index(n_in, n_out), err_msg=f"{n_in}->{n_out}"
    )
  for n_in, n_out in ((500, 32), (375, 24), (333, 21)):
    got = np.asarray(image_ops.resize_nearest(jnp.arange(n_in)[None, :, None], (n_out, 1)))[0, :, 0]
    np.testing.assert_array_equal(got, torch_nearest_index(n_in, n_out))


def test_nearest_matches_torch_float32_rounding():
  # torch computes floorf(i * float32(in/out)), which rounds below an exact integer for some pairs.
  assert exact_nearest_index(26, 22)[11] == 13 and torch_nearest_index(26, 22)[11] == 12
  x = jnp.arange(26)[None, :, None]
  got = np.asarray(image_ops.resize_nearest(x, (22, 1)))[0, :, 0]
  np.testing.assert_array_equal(got, torch_nearest_index(26, 22))


@pytest.mark.parametrize("in_hw,out_hw", SIZES + [((26, 26), (22, 22))])
def test_against_torch(in_hw, out_hw):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = rand((2, *in_hw, 3), seed=9)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)

  def t(**kw):
    return F.interpolate(xt, size=out_hw, **kw).permute(0, 2, 3, 1).numpy()

  xj = jnp.asarray(x)
  np.testing.assert_allclose(
      np.asarray(image_ops.resize_bilinear(xj, out_hw)),
      t(mode="bilinear", align_corners=False),
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      np.asarray(image_ops.resize_bilinear_align_corners(xj, out_hw)),
      t(mode="bilinear", align_corners=True),
      rtol=1e-5,
      atol=2e-5,
  )
  np.testing.assert_array_equal(np_nearest(x, out_hw), t(mode="nearest"))
  np.testing.assert_array_equal(np.asarray(image_ops.resize_nearest(xj, out_hw)), t(mode="nearest"))
