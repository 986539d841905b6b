"""Bilinear resizing as matrices (layers/interpolate.py)."""
import numpy as np
import paddle

from layers.interpolate import interpolation_matrix


def test_interpolation_matrix_matches_paddle_bilinear():
    x = paddle.rand([2, 3, 35, 18])
    expected = paddle.nn.functional.interpolate(x, size=(69, 35), mode='bilinear', align_corners=False)
    rows, cols = interpolation_matrix(35, 69), interpolation_matrix(18, 35)
    np.testing.assert_allclose(rows @ x.numpy() @ cols.T, expected.numpy(), rtol=0, atol=2e-6)
