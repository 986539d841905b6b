"""Exact bilinear resampling (align_corners=False), the numbers PyTorch's and Paddle's kernels compute.

One description of a 1-D half-pixel linear resize, ``linear_taps`` (two source
indices and weights per output sample), serves every bilinear resize outside
``F.interpolate``: the evaluation preprocessing in numpy (``resize_bilinear``,
data/transforms.py), PostProcess's exact mask windows (``sample_taps``,
layers/output_utils.py) and the export's matrix form of ``yolact.Resize``
(``interpolation_matrix``), and the same taps in Paddle ops (``taps_tensors``,
``sample_taps_tensor``: the device mask upsampling, and the preprocessing before Paddle 3.3).
It imports no project code.
"""
import numpy as np
import paddle


def linear_taps(in_size, out_size):
    """Source indices and weights of half-pixel linear resampling along one axis.

    Sample positions are PyTorch's (bit-identical on ramp images): the scale is
    the float32 quotient in/out, the position scale * (i + 0.5) - 0.5 is rounded
    to float32 and clamped at 0. Paddle's kernel agrees within 1.5e-5 px.
    cv2.resize keeps the scale in double precision, which moves the positions by
    up to 4e-5 px on a 640 -> 550 resize and the values of the reference fixture
    image by up to 0.01 (1.7e-4 after normalisation).
    Returns (i0 [out], i1 [out], w0 [out], w1 [out]).
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, np.float32(1) - w1, w1


def resize_bilinear(img, height, width):
    """[H, W, C] float32 -> [height, width, C] float32, bilinear with align_corners=False.

    Numerically what ``F.interpolate(..., mode='bilinear', align_corners=False)``
    gives in Paddle and PyTorch (no antialiasing when downscaling), computed
    separably: along the width first, then the height.
    """
    return sample_taps(img, linear_taps(img.shape[0], height), linear_taps(img.shape[1], width))


def sample_taps(img, taps_y, taps_x):
    """[H, W, ...] -> [len(taps_y), len(taps_x), ...]: the linear samples ``linear_taps`` describes.

    taps_y, taps_x: (i0, i1, w0, w1) as linear_taps returns them, or slices
    of them (a window of the output), with i0 and i1 indexing ``img``. Along
    the width first, then the height, as PyTorch computes it.
    """
    x0, x1, wx0, wx1 = taps_x
    y0, y1, wy0, wy1 = taps_y
    tail = (1,) * (img.ndim - 2)
    rows = img[:, x0] * wx0.reshape((-1,) + tail) + img[:, x1] * wx1.reshape((-1,) + tail)
    return rows[y0] * wy0.reshape((-1, 1) + tail) + rows[y1] * wy1.reshape((-1, 1) + tail)


def interpolation_matrix(in_size, out_size):
    """[out_size, in_size] float32 matrix of a 1-D linear resize with align_corners=False.

    Row i holds the two taps of output sample i with Paddle's kernel weights
    (:func:`linear_taps`), so ``A @ v`` resizes a vector ``v``.
    """
    i0, i1, w0, w1 = linear_taps(in_size, out_size)
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    # add.at: at the border both taps are the same pixel and their weights add up.
    np.add.at(matrix, (rows, i0), w0)
    np.add.at(matrix, (rows, i1), w1)
    return matrix


def taps_tensors(in_size, out_size, place):
    """:func:`linear_taps` as Paddle tensors on ``place``: (i0, i1 int64, w0, w1 float32), each [out_size]."""
    return tuple(paddle.to_tensor(a, place=place) for a in linear_taps(in_size, out_size))


def sample_taps_tensor(x, taps_y, taps_x):
    """:func:`sample_taps` in Paddle ops over the last two axes: [..., H, W] -> [..., len(taps_y), len(taps_x)].

    taps_y, taps_x: (i0, i1, w0, w1) tensors (:func:`taps_tensors`). The same
    operations in the same order as :func:`sample_taps`, so the same float32 results.
    """
    x0, x1, wx0, wx1 = taps_x
    y0, y1, wy0, wy1 = taps_y
    h_axis, w_axis = x.ndim - 2, x.ndim - 1
    rows = paddle.gather(x, x0, axis=w_axis) * wx0 + paddle.gather(x, x1, axis=w_axis) * wx1
    return (paddle.gather(rows, y0, axis=h_axis) * wy0.unsqueeze(1)
            + paddle.gather(rows, y1, axis=h_axis) * wy1.unsqueeze(1))
