"""Feature maps -> patches and maps: where a backbone's outputs become the vectors the methods model,
and a grid of patch scores becomes a heat map of the network's view.

Shapes: feature maps are [(N, C_l, h_l, w_l), ...] float32, shallowest first; patches (N, P, D) with
P = grid**2 positions; maps (N, S, S) float32 on the S x S network view.
"""
import functools
import math

import cv2
import numpy as np

from errors import MethodError

PIXEL_MAP_SIGMA = 4.0  # Gaussian smoothing of the upsampled map, pixels (as in PaDiM and PatchCore)
MAP_CHANNELS = 128  # the most channels OpenCV 5's resize takes in one array (OpenCV 4: 512)


def pool_features(feature_maps):
    """[(N, C_l, h_l, w_l), ...] -> [(N, C_l), ...] float32 by global average pooling."""
    return [m.reshape(m.shape[0], m.shape[1], -1).mean(axis=2) for m in feature_maps]


def choose_pixel_levels(map_sizes, input_size):
    """Indices of the outputs used for localization: those with a stride of 4 to 16 pixels.

    Deeper maps are too coarse to localise; shallower ones too generic (and large).
    """
    return [i for i, size in enumerate(map_sizes) if input_size / 16 <= size <= input_size / 4]


def _pooling_matrix(size, grid):
    """(size, grid) matrix whose product averages a length-`size` axis onto `grid` cells (area
    weights, exact for fractional cells). Two matrix products pool a map 7x faster than reshaping."""
    edges = np.linspace(0, size, grid + 1)
    pixel = np.arange(size)
    overlap = np.clip(np.minimum(pixel[:, None] + 1, edges[None, 1:]) - np.maximum(pixel[:, None], edges[None, :-1]), 0, None)
    return (overlap / overlap.sum(axis=0)).astype(np.float32)


def _bilinear_matrix(size, grid):
    """(size, grid) matrix whose product resamples a length-`size` axis to `grid` samples, bilinear
    with half-pixel centres (OpenCV's INTER_LINEAR, torch's align_corners=False)."""
    source = np.clip((np.arange(grid) + 0.5) * size / grid - 0.5, 0, size - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size - 1)
    matrix = np.zeros((size, grid), np.float32)
    np.add.at(matrix, (low, np.arange(grid)), 1 - (source - low))
    np.add.at(matrix, (high, np.arange(grid)), source - low)
    return matrix


def resampling_matrix(size, grid):
    """(size, grid) float32 matrix resampling a length-`size` axis to `grid`: area average when
    shrinking, bilinear when enlarging."""
    return _pooling_matrix(size, grid) if size > grid else _bilinear_matrix(size, grid)


def resample(maps, grid):
    """(N, C, h, w) -> (N, C, grid, grid): area average when shrinking, bilinear when enlarging."""
    h, w = maps.shape[-2:]
    if (h, w) == (grid, grid):
        return maps
    return np.matmul(np.matmul(resampling_matrix(h, grid).T, maps), resampling_matrix(w, grid))


def embed_patches(feature_maps, levels, grid):
    """The chosen levels resampled to one grid and stacked: -> (N, P, D) float32, P = grid**2."""
    parts = [resample(feature_maps[level], grid) for level in levels]
    stacked = np.concatenate([p.reshape(p.shape[0], p.shape[1], -1) for p in parts], axis=1)
    return np.ascontiguousarray(stacked.transpose(0, 2, 1), np.float32)


def upsample_and_smooth(grids, output_size, sigma=PIXEL_MAP_SIGMA):
    """(N, g, g) -> (N, S, S): bilinear upsampling then Gaussian smoothing.

    The batch is laid out as image channels so OpenCV treats it in one call per MAP_CHANNELS maps.
    """
    out = np.empty((len(grids), output_size, output_size), np.float32)
    for start in range(0, len(grids), MAP_CHANNELS):
        chunk = np.ascontiguousarray(grids[start:start + MAP_CHANNELS].transpose(1, 2, 0), np.float32)
        resized = cv2.resize(chunk, (output_size, output_size), interpolation=cv2.INTER_LINEAR)
        smoothed = cv2.GaussianBlur(resized, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        out[start:start + MAP_CHANNELS] = smoothed.reshape(output_size, output_size, -1).transpose(2, 0, 1)
    return out



@functools.lru_cache(maxsize=8)
def smoothing_matrix(grid, output_size, sigma=PIXEL_MAP_SIGMA):
    """(output_size, grid) float32 matrix K with K @ m @ K.T = upsample_and_smooth(m) (to float32 rounding):
    OpenCV's float INTER_LINEAR upsampling, then its Gaussian (kernel 8 sigma + 1 wide, BORDER_REFLECT).
    The exported graph's smoothing, and a batched product for many maps at once (held-out maxima)."""
    upsample = np.zeros((output_size, grid))
    for d in range(output_size):  # the float path keeps the float32 fraction (no 1/2048 units)
        position = np.float32((d + 0.5) * (1.0 / (output_size / grid)) - 0.5)
        s = math.floor(position)
        f = 0.0 if s < 0 or s >= grid - 1 else float(np.float32(position - np.float32(s)))
        upsample[d, min(max(s, 0), grid - 1)] += 1 - f
        upsample[d, min(max(s + 1, 0), grid - 1)] += f
    ksize = int(round(sigma * 4 * 2 + 1)) | 1  # OpenCV's default size for float images
    kernel = cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F).ravel().astype(np.float64)
    blur = np.zeros((output_size, output_size))
    for i in range(output_size):
        for t, weight in enumerate(kernel):
            j = i + t - ksize // 2
            while j < 0 or j >= output_size:  # BORDER_REFLECT: fedcba|abcdefgh|hgfedcb
                j = -j - 1 if j < 0 else 2 * output_size - j - 1
            blur[i, j] += weight
    return (blur @ upsample).astype(np.float32)


def patch_grid(shapes, input_size, required_by=None):
    """Localization levels (stride 4..16) of outputs of (C, h, w) `shapes`, and the side of the
    coarsest of them: ([], 0) if none, or MethodError if the method `required_by` needs them."""
    map_sizes = [shape[-1] for shape in shapes]
    levels = choose_pixel_levels(map_sizes, input_size)
    if not levels and required_by:
        raise MethodError(f'{required_by} needs feature maps of stride 4..16; this backbone has none: '
                          'use --method mahalanobis')
    return levels, min(map_sizes[l] for l in levels) if levels else 0

