"""Export a fitted detector as one ONNX model: camera pixels in; score, heat map and verdict out.

The graph holds everything the tool does after decoding an image, so any onnxruntime (Python, C++,
C#, Java, JavaScript, mobile) scores like the tool without this project installed:

    image (N, H, W, 3) uint8 RGB
      [-> resize to the training images' size, where they share one and
          the image has their aspect ratio                                (image_utils.to_training_size)]
      -> resize so the shorter side is resize_size, centre crop to S      (image_utils.network_view)
      -> normalise, NHWC -> NCHW                                           (image_utils.to_tensor)
      -> the backbone's own graph                                          (model_utils.FeatureExtractor)
      -> the fitted method's features and scoring                          (anomaly_model.*Method)
      [-> with several input sizes S, the above once per size (the backbone's weights stored once),
          then the scales' scores and maps fused                            (fusion)]
      -> score (N,) float32, anomaly_map (N, S, S) float32, anomaly (N,) bool

The resize reproduces OpenCV's arithmetic for uint8 images step by step rather than approximating it
with a resampling operator, because the view's pixels must equal the tool's (and a 1-level change
in a pixel moves a Mahalanobis score): INTER_AREA when shrinking (float32 taps accumulated in
OpenCV's order, or integer block sums for integer ratios), INTER_LINEAR when enlarging (OpenCV's
11-bit fixed-point coefficients and its vector rounding, in int32), then OpenCV's rounding. For a
given input size all of it is fixed index and weight tables (tests/test_export.py checks the view
pixel for pixel against cv2 for shrinking, integer and enlarging sizes). Everything after the view
is float32 arithmetic in another order than NumPy's, so scores agree to about 1e-6 relative.
"""
import json
import logging
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import feature_maps
import image_utils
from errors import ModelError, UsageError
from file_io import atomic_write_bytes
from backbone_graph import feature_graph

MIN_OPSET = 13          # ReduceSum's axes as an input, Squeeze/Unsqueeze axes as inputs
BANK_CHUNK = 4096       # PatchCore: bank rows per distance block (peak memory: N x P x BANK_CHUNK floats)
RESIZE_COEF_BITS = 11   # OpenCV's INTER_RESIZE_COEF_BITS (fixed-point INTER_LINEAR on uint8)
logger = logging.getLogger('mahalanobisad')


# ----------------------------------------------------------------------------------------------
# OpenCV's resize tables
# ----------------------------------------------------------------------------------------------

def _area_taps(ssize, dsize):
    """OpenCV's INTER_AREA decimation table for one axis (computeResizeAreaTab): per output index,
    its source indices and float32 weights in accumulation order -> (indices (K, dsize), weights
    (K, dsize) float32), padded with zero weights to K taps each."""
    scale = 1.0 / (dsize / ssize)  # as OpenCV: 1 / inv_scale, in double
    taps = [[] for _ in range(dsize)]
    for d in range(dsize):
        start = d * scale
        end = start + scale
        cell = min(scale, ssize - start)
        first, last = math.ceil(start), math.floor(end)
        last = min(last, ssize - 1)
        first = min(first, last)
        if first - start > 1e-3:
            taps[d].append((first - 1, (first - start) / cell))
        taps[d] += [(s, 1.0 / cell) for s in range(first, last)]
        if end - last > 1e-3:
            taps[d].append((last, min(min(end - last, 1.0), cell) / cell))
    count = max(len(t) for t in taps)
    indices, weights = np.zeros((count, dsize), np.int64), np.zeros((count, dsize), np.float32)
    for d, row in enumerate(taps):
        for k, (s, w) in enumerate(row):
            indices[k, d], weights[k, d] = s, np.float32(w)
    return indices, weights


def _linear_taps(ssize, dsize, clamp_fraction):
    """OpenCV's INTER_LINEAR table for one axis: (first source index, second source index,
    coefficients (dsize, 2) in 1/2048 units). Outside the image OpenCV clamps the fraction to 0
    along x but keeps it (over the clipped edge row, so the same value) along y."""
    scale = 1.0 / (dsize / ssize)
    first, second = np.zeros(dsize, np.int64), np.zeros(dsize, np.int64)
    coefficients = np.zeros((dsize, 2), np.int64)
    one = np.float32(1 << RESIZE_COEF_BITS)
    for d in range(dsize):
        position = np.float32((d + 0.5) * scale - 0.5)
        s = math.floor(position)
        fraction = np.float32(position - np.float32(s))
        if clamp_fraction and (s < 0 or s >= ssize - 1):
            fraction = np.float32(0)
        coefficients[d] = [int(np.rint((np.float32(1) - fraction) * one)), int(np.rint(fraction * one))]
        first[d], second[d] = min(max(s, 0), ssize - 1), min(max(s + 1, 0), ssize - 1)
    return first, second, coefficients


def resize_plan(height, width, resize_size):
    """What image_utils.resize_short_side does to an (height, width) image: ('none' | 'area' |
    'area_integer' | 'linear', (new_height, new_width))."""
    new_h, new_w = image_utils.short_side_shape(height, width, resize_size)
    return _resize_kind(height, width, new_h, new_w, enlarging=resize_size > min(height, width)), (new_h, new_w)


def _resize_kind(height, width, new_h, new_w, enlarging):
    """'none' | 'linear' (enlarging: INTER_LINEAR) | 'area_integer' | 'area' (INTER_AREA), with OpenCV's
    own test for integer ratios (1 / (dsize / ssize) within DBL_EPSILON of an integer on both axes)."""
    if (new_h, new_w) == (height, width):
        return 'none'
    if enlarging:
        return 'linear'
    ratios = [1.0 / (new / old) for new, old in ((new_w, width), (new_h, height))]
    integer = all(abs(r - int(r)) < np.finfo(float).eps for r in ratios)
    return 'area_integer' if integer else 'area'


# ----------------------------------------------------------------------------------------------
# Graph building
# ----------------------------------------------------------------------------------------------

class _Graph:
    """A small onnx.helper wrapper: op() adds a node and returns its output name, const() an
    initializer."""

    def __init__(self, opset):
        self.opset = opset
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f'{hint}_{self.count}'

    def const(self, array, hint='c'):
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, outputs=1, name=None, **attributes):
        names = [name] if name else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name('n_' + op_type), **attributes))
        return names[0] if outputs == 1 else names

    def reduce(self, op_type, x, axes, keepdims=0):
        """A Reduce* node over `axes`, in the form this opset wants (axes an input from opset 18;
        ReduceSum from 13)."""
        if self.opset >= 18 or op_type == 'ReduceSum':
            return self.op(op_type, [x, self.const(np.array(axes, np.int64), 'axes')], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def shape_const(self, shape):
        return self.const(np.array(shape, np.int64), 'shape')


def _add_planes(g, image, height, width, training_size=None):
    """image (N, height, width, 3) uint8 -> (planes (N * 3, h, w), h, w): channels first, brought to
    training_size (W, H) where image_utils.to_training_size does so (once, for every input size's view).

    Channels first, as (N * 3, h, w) planes: every gather runs along the middle axis, copying whole
    rows (onnxruntime's Gather and broadcast Mul are several times slower on the innermost axis),
    and a pass along columns runs on transposed planes (a fast batched 2-D transpose)."""
    planes = g.op('Reshape', [g.op('Transpose', [image], perm=[0, 3, 1, 2]), g.shape_const([-1, height, width])])
    matched = image_utils.training_size_shape(height, width, training_size)
    if matched is None:
        return planes, height, width
    kind = _resize_kind(height, width, *matched, enlarging=not matched[0] < height)
    planes = _resize_planes(g, planes, height, width, matched, kind, np.arange(matched[0]), np.arange(matched[1]))
    return planes, matched[0], matched[1]


def _add_view(g, planes, height, width, resize_size, crop_size):
    """_add_planes' planes -> the centre crop_size square of the image resized by
    image_utils.resize_short_side: float32 (N, 3, S, S) holding the uint8 values."""
    kind, (new_h, new_w) = resize_plan(height, width, resize_size)
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    view = _resize_planes(g, planes, height, width, (new_h, new_w), kind, np.arange(top, top + crop_size),
                          np.arange(left, left + crop_size))
    return g.op('Reshape', [view, g.shape_const([-1, 3, crop_size, crop_size])])


def _resize_planes(g, planes, height, width, new_shape, kind, rows, cols):
    """planes (N * 3, height, width) holding uint8 values (uint8 or float32) -> float32 (N * 3,
    len(rows), len(cols)): rows `rows` and columns `cols` (contiguous ranges) of the planes resized to
    new_shape (new_h, new_w) by cv2.resize with the interpolation of `kind` (_resize_kind), its uint8
    rounding included."""
    new_h, new_w = new_shape

    def crop(x, row_range, col_range):
        starts, ends = [row_range[0], col_range[0]], [row_range[1], col_range[1]]
        return g.op('Slice', [x, g.const(np.array(starts, np.int64)), g.const(np.array(ends, np.int64)),
                              g.const(np.array([1, 2], np.int64))])

    def gather_rows(x, indices):
        return g.op('Gather', [x, g.const(np.asarray(indices, np.int64), 'index')], axis=1)

    def transpose_planes(x):
        return g.op('Transpose', [x], perm=[0, 2, 1])

    def clip_255(x):
        return g.op('Clip', [x, g.const(np.float32(0)), g.const(np.float32(255))])

    def as_float(x):
        return g.op('Cast', [x], to=TensorProto.FLOAT)

    first_row, first_col = int(rows[0]), int(cols[0])
    if kind == 'none':
        return as_float(crop(planes, (first_row, first_row + len(rows)), (first_col, first_col + len(cols))))

    if kind == 'area_integer':  # resizeAreaFast: integer block sums (below 2^24: exact in float32)
        sy, sx = height // new_h, width // new_w
        x = crop(planes, (first_row * sy, (first_row + len(rows)) * sy), (first_col * sx, (first_col + len(cols)) * sx))
        x = g.op('Reshape', [as_float(x), g.shape_const([-1, len(rows), sy, len(cols), sx])])
        total = g.reduce('ReduceSum', x, [2, 4])                                          # (N * 3, R, C)
        if sy == sx == 2:  # OpenCV's 2x2 path: (sum + 2) >> 2
            return g.op('Floor', [g.op('Mul', [g.op('Add', [total, g.const(np.float32(2))]), g.const(np.float32(0.25))])])
        return clip_255(g.op('Round', [g.op('Mul', [total, g.const(np.float32(1.0 / (sy * sx)))])]))  # sum * (1.f/area)

    if kind == 'area':  # resizeArea_<uchar, float>: float32 taps accumulated in OpenCV's order
        y_idx, y_w = _area_taps(height, new_h)
        x_idx, x_w = _area_taps(width, new_w)
        y_idx, y_w, x_idx, x_w = y_idx[:, rows], y_w[:, rows], x_idx[:, cols], x_w[:, cols]
        first, last = y_idx[y_w > 0].min(), y_idx[y_w > 0].max()
        y_idx = (y_idx - first).clip(0, last - first)
        x = transpose_planes(as_float(crop(planes, (first, last + 1), (0, width))))
        along_rows = None                                                                  # (N * 3, C, H')
        for k in range(len(x_idx)):
            term = g.op('Mul', [gather_rows(x, x_idx[k]), g.const(x_w[k].reshape(1, -1, 1))])
            along_rows = term if along_rows is None else g.op('Add', [along_rows, term])
        along_rows = transpose_planes(along_rows)                                          # (N * 3, H', C)
        total = None
        for k in range(len(y_idx)):
            term = g.op('Mul', [gather_rows(along_rows, y_idx[k]), g.const(y_w[k].reshape(1, -1, 1))])
            total = term if total is None else g.op('Add', [total, term])
        return clip_255(g.op('Round', [total]))

    # INTER_LINEAR (enlarging), uint8 fixed point: the horizontal pass in 1/2048 units, the vertical
    # one as OpenCV's vector code: ((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16), then (+ 2) >> 2.
    x0, x1, a = _linear_taps(width, new_w, clamp_fraction=True)
    y0, y1, b = _linear_taps(height, new_h, clamp_fraction=False)
    x0, x1, a, y0, y1, b = x0[cols], x1[cols], a[cols], y0[rows], y1[rows], b[rows]
    x = transpose_planes(g.op('Cast', [planes], to=TensorProto.INT32))                      # (N * 3, W, H)

    def int_column(values):
        return g.const(np.asarray(values, np.int32).reshape(1, -1, 1))
    horizontal = g.op('Add', [g.op('Mul', [gather_rows(x, x0), int_column(a[:, 0])]),
                              g.op('Mul', [gather_rows(x, x1), int_column(a[:, 1])])])
    horizontal = transpose_planes(horizontal)                                              # (N * 3, H, C)
    sixteen, high = g.const(np.int32(16)), g.const(np.int32(1 << 16))

    def vertical(source, coefficient):  # non-negative throughout, so Div is a right shift
        return g.op('Div', [g.op('Mul', [g.op('Div', [gather_rows(horizontal, source), sixteen]),
                                        int_column(coefficient)]), high])
    total = g.op('Add', [vertical(y0, b[:, 0]), vertical(y1, b[:, 1])])
    total = g.op('Div', [g.op('Add', [total, g.const(np.int32(2))]), g.const(np.int32(4))])
    return clip_255(as_float(total))


def _add_backbone(g, backbone, x, copy_index=0):
    """Inline the backbone ModelProto (pooled outputs already rewritten to maps), fed with x;
    -> names of its outputs, each (N, C, h, w). copy_index: which copy of the backbone this is (one
    per input size): its weights are stored once, with the first copy, and shared by the others."""
    prefix = 'backbone/' if not copy_index else f'backbone{copy_index}/'
    graph = backbone.graph
    initializers = {i.name for i in graph.initializer}  # old IRs list initializers among the inputs too
    input_name = next(i.name for i in graph.input if i.name not in initializers)

    def rename(name):
        if name == input_name:
            return x
        return 'backbone/' + name if name in initializers else (prefix + name if name else name)
    for init in graph.initializer if not copy_index else ():
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename(init.name)
        g.initializers.append(copy)
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.ClearField('input')
        copy.ClearField('output')
        copy.input.extend(rename(i) for i in node.input)
        copy.output.extend(rename(o) for o in node.output)
        copy.name = prefix + node.name if node.name else ''
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ModelError('cannot export a backbone with subgraphs (If/Loop/Scan)')
        g.nodes.append(copy)
    return [rename(o.name) for o in graph.output]


# ----------------------------------------------------------------------------------------------
# The methods' scoring in ONNX, one function per anomaly_model method
# ----------------------------------------------------------------------------------------------

def _pool(g, feature_map):
    return g.reduce('ReduceMean', feature_map, [2, 3])  # feature_maps.pool_features


def _embed_patches(g, maps, shapes, levels, grid):
    """feature_maps.embed_patches: levels resampled onto grid x grid, stacked -> (N, P, D)."""
    parts = []
    for level in levels:
        x, (channels, h, w) = maps[level], shapes[level]
        if (h, w) != (grid, grid):
            x = g.op('MatMul', [g.const(feature_maps.resampling_matrix(h, grid).T), x])
            x = g.op('MatMul', [x, g.const(feature_maps.resampling_matrix(w, grid))])
        parts.append(g.op('Reshape', [x, g.shape_const([0, channels, grid * grid])]))
    stacked = g.op('Concat', parts, axis=1) if len(parts) > 1 else parts[0]
    return g.op('Transpose', [stacked], perm=[0, 2, 1])


def _squared_norms(g, x):
    """(..., D) -> (..., 1) row sums of squares."""
    return g.op('ReduceSum', [g.op('Mul', [x, x]), g.const(np.array([-1], np.int64))], keepdims=1)


def _distance_constants(g, b):
    """Constants for squared distances to the rows of b (B, D): (-2 b.T, |b|^2) initializer names.
    The -2 is folded in (a power of two: the same rounding), saving a full-size intermediate."""
    return g.const(np.ascontiguousarray(-2 * b.T, np.float32), 'bank'), g.const(np.einsum('ij,ij->i', b, b))


def _squared_distances(g, a, constants):
    """nearest_neighbours.squared_distances, |a|^2 - 2 a.b + |b|^2: a (..., M, D) -> (..., M, B)."""
    minus_two_b_t, b_norms = constants
    return g.op('Add', [g.op('Add', [_squared_norms(g, a), g.op('MatMul', [a, minus_two_b_t])]), b_norms])


def _sqrt_clipped(g, squared):
    return g.op('Sqrt', [g.op('Max', [squared, g.const(np.float32(0))])])


def _pixel_gaussian(g, patches, model):
    """PixelGaussian.distances: (N, P, D) -> (N, P)."""
    by_position = g.op('Transpose', [patches], perm=[1, 0, 2])                        # (P, N, D)
    centred = g.op('Sub', [by_position, g.const(model.mean_[:, None, :].astype(np.float32))])
    projected = g.op('MatMul', [centred, g.const(model.precision_.astype(np.float32))])
    squared = g.reduce('ReduceSum', g.op('Mul', [projected, centred]), [2])            # (P, N)
    return g.op('Transpose', [_sqrt_clipped(g, squared)], perm=[1, 0])


def _upsample_and_smooth(g, distances, grid, output_size):
    """(N, P) patch distances -> (N, S, S) map, as feature_maps.upsample_and_smooth."""
    grids = g.op('Reshape', [distances, g.shape_const([-1, grid, grid])])
    k = feature_maps.smoothing_matrix(grid, output_size)
    return g.op('MatMul', [g.op('MatMul', [g.const(k), grids]), g.const(np.ascontiguousarray(k.T))])


def _mahalanobis(g, method, maps, shapes, output_size):
    params = method.params
    total = None
    for level, mean, precision in zip(params['image_levels'], method.image_model_.means_,
                                      method.image_model_.precisions_):
        centred = g.op('Sub', [_pool(g, maps[level]), g.const(mean.astype(np.float32))])
        projected = g.op('MatMul', [centred, g.const(precision.astype(np.float32))])
        distance = _sqrt_clipped(g, g.reduce('ReduceSum', g.op('Mul', [projected, centred]), [1]))
        total = distance if total is None else g.op('Add', [total, distance])
    if method.pixel_model_ is None:
        return total, None
    patches = _embed_patches(g, maps, shapes, params['pixel_levels'], params['grid'])
    distances = _pixel_gaussian(g, patches, method.pixel_model_)
    return total, _upsample_and_smooth(g, distances, params['grid'], output_size)


def _padim(g, method, maps, shapes, output_size):
    params = method.params
    patches = _embed_patches(g, maps, shapes, params['levels'], params['grid'])
    patches = g.op('Gather', [patches, g.const(np.array(params['channels'], np.int64))], axis=2)
    anomaly_map = _upsample_and_smooth(g, _pixel_gaussian(g, patches, method.gaussian_), params['grid'], output_size)
    return g.reduce('ReduceMax', anomaly_map, [1, 2]), anomaly_map


def _spade(g, method, maps, shapes, output_size):
    params = method.params
    train_pooled = method.train_pooled_.astype(np.float32)
    train_patches = method.train_patches_.astype(np.float32)                            # (T, P, D)
    k = min(params['k'], len(train_pooled))
    pooled = _pool(g, maps[params['image_level']])
    distances = _sqrt_clipped(g, _squared_distances(g, pooled, _distance_constants(g, train_pooled)))
    nearest_distances, nearest = g.op('TopK', [distances, g.const(np.array([k], np.int64))], outputs=2,
                                      largest=0, sorted=1)
    score = g.reduce('ReduceMean', nearest_distances, [1])
    # Per image, the gallery is the patches of its k nearest training images.
    t, p, d = train_patches.shape
    gallery = g.op('Reshape', [g.op('Gather', [g.const(train_patches), nearest], axis=0), g.shape_const([-1, k * p, d])])
    gallery_norms = g.op('Transpose', [_squared_norms(g, gallery)], perm=[0, 2, 1])   # (N, 1, kP)
    patches = _embed_patches(g, maps, shapes, params['levels'], params['grid'])      # (N, P, D)
    product = g.op('MatMul', [patches, g.op('Transpose', [gallery], perm=[0, 2, 1])])
    squared = g.op('Add', [g.op('Sub', [_squared_norms(g, patches), g.op('Mul', [product, g.const(np.float32(2))])]),
                           gallery_norms])
    nearest_patch = _sqrt_clipped(g, g.reduce('ReduceMin', squared, [2]))
    return score, _upsample_and_smooth(g, nearest_patch, params['grid'], output_size)


def _augmented_bank(bank):
    """The bank (B, D) as one matrix product's right side: (D + 1, B) float32 [-2 bank.T; |bank|^2],
    so that [q, 1] @ it + |q|^2 are the squared distances of q to the rows (|q|^2 - 2 q.b + |b|^2)."""
    return np.concatenate([-2 * bank.T, np.einsum('ij,ij->i', bank, bank)[None]]).astype(np.float32)


def _bank_columns(g, weights, start, end):
    """Columns start..end of the augmented bank: a Slice of a constant, folded into a constant of its
    own when onnxruntime optimises the graph (the file holds the bank once)."""
    return g.op('Slice', [weights, g.const(np.array([start], np.int64)), g.const(np.array([end], np.int64)),
                          g.const(np.array([1], np.int64))])


def _block_minima(g, squared, start):
    """The minimum of each row of a distance block (M, C) and its bank index: ((M, 1), (M, 1) int64)."""
    return (g.reduce('ReduceMin', squared, [1], keepdims=1),
            g.op('Add', [g.op('ArgMin', [squared], axis=1, keepdims=1), g.const(np.int64(start))]))


def _across_blocks(g, minima, arguments):
    """The smallest of the per-block minima (M, 1) and its index."""
    if len(minima) == 1:
        return minima[0], arguments[0]
    stacked = g.op('Concat', minima, axis=1)                                                # (M, blocks)
    best_block = g.op('ArgMin', [stacked], axis=1, keepdims=1)
    return (g.op('GatherElements', [stacked, best_block], axis=1),
            g.op('GatherElements', [g.op('Concat', arguments, axis=1), best_block], axis=1))


def _exact_search(g, augmented, query_norms, weights, b):
    """Brute force: the squared distance (M, 1) of each query to its nearest bank row and that row
    (M, 1) int64, as matrix products in blocks of BANK_CHUNK rows (one (M, chunk) block alive at a time)."""
    blocks = []
    for start in range(0, b, BANK_CHUNK):
        block = g.op('MatMul', [augmented, _bank_columns(g, weights, start, start + BANK_CHUNK)])
        blocks.append(_block_minima(g, g.op('Add', [block, query_norms]), start))
    return _across_blocks(g, *zip(*blocks))


UNPROBED = np.float32(1e30)  # what a query finds in an empty inverted list


def _inverted_file_search(g, queries, augmented, query_norms, weights, index, list_sizes):
    """NearestPatchIndex's inverted-file search, computing only the distances the index computes.

    queries (M, D); augmented (M, D + 1), the queries with a 1 appended; query_norms (M, 1); weights:
    _augmented_bank of the bank with its rows grouped by list (list_sizes (L,) rows each, in list
    order). Each query probes the index.probes lists whose centres are nearest (faiss's IndexFlatL2
    ranking, by the same |q|^2 - 2 q.c + |c|^2). The (query, list) pairs are sorted by list and split
    into one group per list, so each list's rows meet, in one matrix product, exactly the queries that
    probe it. -> (squared distance (M, 1) to the nearest row of the probed lists, UNPROBED where they
    are all empty; that row (M, 1) int64, in list order)."""
    lists, probes = len(list_sizes), index.probes
    centre_distances = _squared_distances(g, queries, _distance_constants(g, index.centroids))    # (M, L)
    _, probed = g.op('TopK', [centre_distances, g.const(np.array([probes], np.int64))], outputs=2,
                     largest=0, sorted=1)                                                          # (M, probes)
    pairs = g.op('Reshape', [probed, g.shape_const([-1])])        # (M * probes,): the list pair q * probes + j probes
    n_pairs = g.op('Shape', [pairs])
    pair_lists, by_list = g.op('TopK', [pairs, n_pairs], outputs=2, largest=0, sorted=1)  # pairs sorted by list
    present, _, _, present_counts = g.op('Unique', [pairs], outputs=4, sorted=1)
    pairs_per_list = g.op('ScatterElements', [g.const(np.zeros(lists, np.int64)), present, present_counts], axis=0)
    groups = g.op('Split', [g.op('Div', [by_list, g.const(np.int64(probes))]), pairs_per_list], outputs=lists,
                  axis=0)                                            # per list, the queries probing it
    starts = np.concatenate([[0], np.cumsum(list_sizes)[:-1]]).astype(np.int64)
    minima, rows = [], []
    for group, start, size in zip(groups if lists > 1 else [groups], starts, list_sizes):
        if size == 0:  # nothing to find: UNPROBED, row 0
            column = g.op('Unsqueeze', [group, g.const(np.array([1], np.int64))])
            minima.append(g.op('Expand', [g.const(UNPROBED), g.op('Shape', [column])]))
            rows.append(g.op('Mul', [column, g.const(np.int64(0))]))
            continue
        block = g.op('MatMul', [g.op('Gather', [augmented, group], axis=0),
                                _bank_columns(g, weights, start, start + size)])           # (K, size)
        nearest = g.op('ArgMin', [block], axis=1, keepdims=1)
        minima.append(g.op('GatherElements', [block, nearest], axis=1))
        rows.append(nearest)
    minima = g.op('Reshape', [g.op('Concat', minima, axis=0), g.shape_const([-1])])      # per pair, in list order
    rows = g.op('Add', [g.op('Reshape', [g.op('Concat', rows, axis=0), g.shape_const([-1])]),
                        g.op('Gather', [g.const(starts), pair_lists], axis=0)])
    by_pair = [g.op('Reshape', [g.op('ScatterElements', [g.op('Expand', [g.const(init), n_pairs]), by_list, values],
                                     axis=0), g.shape_const([-1, probes])])
               for init, values in ((UNPROBED, minima), (np.int64(0), rows))]        # (M, probes) each
    best = g.op('ArgMin', [by_pair[0]], axis=1, keepdims=1)
    return (g.op('Add', [g.op('GatherElements', [by_pair[0], best], axis=1), query_norms]),
            g.op('GatherElements', [by_pair[1], best], axis=1))


def _patchcore(g, method, maps, shapes, output_size):
    """PatchCoreMethod.score: the nearest-neighbour search, then the re-weighting.

    Where the tool searches an inverted-file index, so does the graph (_inverted_file_search: only the
    probed lists' rows are compared with a query, and the nearest is the index's answer; where every
    probed list is empty, the exact one, as NearestPatchIndex.search); without lists, by brute force.
    The bank is held once, its rows grouped by list (docs/deploying.md)."""
    params = method.params
    b, d = method.bank_.shape
    row_lists = None if method.exact_search else method.index_.row_lists()
    order = np.arange(b) if row_lists is None else np.argsort(row_lists, kind='stable')
    bank = np.ascontiguousarray(method.bank_[order], np.float32)  # rows grouped by list: the indices below count so
    weights = g.const(_augmented_bank(bank), 'bank')
    aggregated = {l: g.op('AveragePool', [maps[l]], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                          count_include_pad=1) for l in params['levels']}
    patches = _embed_patches(g, aggregated, shapes, params['levels'], params['grid'])  # (N, P, D)
    queries = g.op('Reshape', [patches, g.shape_const([-1, d])])                        # (N*P, D)
    query_norms = _squared_norms(g, queries)
    augmented = g.op('Concat', [queries, g.op('Expand', [g.const(np.float32(1)), g.op('Shape', [query_norms])])],
                     axis=1)                                                            # (N*P, D + 1)
    if row_lists is None:
        minimum, index = _exact_search(g, augmented, query_norms, weights, b)
    else:
        list_sizes = np.bincount(row_lists, minlength=len(method.index_.centroids))
        minimum, index = _inverted_file_search(g, queries, augmented, query_norms, weights, method.index_, list_sizes)
        # The exact search serves only where a query's probed lists can all be empty (NearestPatchIndex's
        # fallback): with fewer empty lists than probes, never, and it is left out.
        if np.sum(list_sizes == 0) >= method.index_.probes:
            exact_minimum, exact_index = _exact_search(g, augmented, query_norms, weights, b)
            found = g.op('Less', [minimum, g.const(UNPROBED / 2)])
            minimum = g.op('Where', [found, minimum, exact_minimum])
            index = g.op('Where', [found, index, exact_index])
    p = params['grid'] ** 2
    distances = g.op('Reshape', [_sqrt_clipped(g, minimum), g.shape_const([-1, p])])    # (N, P)
    indices = g.op('Reshape', [index, g.shape_const([-1, p])])
    # Re-weighting (PatchCore eq. 7), as PatchCoreMethod.score.
    worst = g.op('ArgMax', [distances], axis=1, keepdims=1)                              # (N, 1)
    worst_distance = g.op('GatherElements', [distances, worst], axis=1)                  # (N, 1)
    anchor_index = g.op('Squeeze', [g.op('GatherElements', [indices, worst], axis=1), g.const(np.array([1], np.int64))])
    bank_rows = g.const(bank, 'bank_rows')
    anchor = g.op('Gather', [bank_rows, anchor_index], axis=0)                            # (N, D)
    worst_patch = g.op('GatherElements', [patches, g.op('Expand', [
        g.op('Unsqueeze', [worst, g.const(np.array([2], np.int64))]), g.shape_const([1, 1, d])])], axis=1)  # (N, 1, D)
    neighbours = min(params['neighbours'], b)
    anchor_augmented = g.op('Concat', [anchor, g.op('Expand', [g.const(np.float32(1)), g.op('Shape', [worst])])],
                            axis=1)                                                       # (N, D + 1)
    to_bank = g.op('Add', [g.op('MatMul', [anchor_augmented, weights]), _squared_norms(g, anchor)])  # (N, B)
    _, nearest = g.op('TopK', [to_bank, g.const(np.array([neighbours], np.int64))], outputs=2, largest=0, sorted=1)
    neighbourhood = g.op('Gather', [bank_rows, nearest], axis=0)                          # (N, b, D)
    difference = g.op('Sub', [neighbourhood, worst_patch])
    spread = g.op('Sqrt', [g.reduce('ReduceSum', g.op('Mul', [difference, difference]), [2])])  # (N, b)
    exp_sum = g.reduce('ReduceSum', g.op('Exp', [g.op('Sub', [spread, worst_distance])]), [1], keepdims=1)
    weight = g.op('Sub', [g.const(np.float32(1)), g.op('Div', [g.const(np.float32(1)), exp_sum])])
    score = g.op('Squeeze', [g.op('Mul', [weight, worst_distance]), g.const(np.array([1], np.int64))])
    return score, _upsample_and_smooth(g, distances, params['grid'], output_size)


_SCORERS = {'mahalanobis': _mahalanobis, 'padim': _padim, 'spade': _spade, 'patchcore': _patchcore}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def _load_backbone(onnx_model):
    """The backbone as FeatureExtractor runs it (pooled outputs rewritten to maps), at opset >= 13, from
    its ONNX file's path or a serialized model (bytes: an int8 backbone, quantize.py)."""
    model, _ = feature_graph(onnx_model)
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), MIN_OPSET)
    if opset < MIN_OPSET:
        from onnx import version_converter
        model = version_converter.convert_version(model, MIN_OPSET)
    if any(o.domain not in ('', 'ai.onnx') for o in model.opset_import):
        raise ModelError('cannot export a backbone with operators outside the standard ONNX domain')
    return model


def build_model(spec, onnx_model, scales, image_size, threshold, metadata=None, footings=None, training_size=None):
    """The whole detector as an onnx.ModelProto.

    spec: model_utils.BackboneSpec; onnx_model: its ONNX file's path, or the serialized model (bytes:
    an int8 backbone, inlined as it is: QuantizeLinear / DequantizeLinear are standard); scales: per
    input size S, ascending, (S, the fitted anomaly_model.AnomalyMethod, each backbone output's shape at
    S without the batch axis: (C, h, w) or (C,) for a pooled output); image_size: (width, height) of the
    graph's input; threshold: the image threshold of the `anomaly` output; metadata: {key: value} stored
    as metadata_props (as text); footings: with several sizes, each one's fusion.Footing: the scores and
    maps are fused as fusion.fuse does. Maps are at the largest size. training_size: (W, H) of the
    training images, where they share one: images are brought to it first (image_utils.to_training_size).
    """
    width, height = image_size
    backbone = _load_backbone(onnx_model)
    opset = max(MIN_OPSET, next(o.version for o in backbone.opset_import if o.domain in ('', 'ai.onnx')))
    g = _Graph(opset)
    output_size = scales[-1][0]
    scale, offset = image_utils.normalization(spec.mean, spec.std)
    results = []
    planes = _add_planes(g, 'image', height, width, training_size)
    for copy_index, (input_size, method, feature_shapes) in enumerate(scales):
        view = _add_view(g, *planes, image_utils.resize_size_for(input_size), input_size)
        tensor = g.op('Sub', [g.op('Mul', [view, g.const(scale.reshape(1, 3, 1, 1))]),
                              g.const(offset.reshape(1, 3, 1, 1))])                  # (N, 3, S, S)
        maps = _add_backbone(g, backbone, tensor, copy_index)
        for i, shape in enumerate(feature_shapes):
            if len(shape) == 1:  # a pooled (N, C) output that could not be rewritten: (N, C, 1, 1)
                maps[i] = g.op('Unsqueeze', [maps[i], g.const(np.array([2, 3], np.int64))])
        shapes = [tuple(s) if len(s) == 3 else (s[0], 1, 1) for s in feature_shapes]
        results.append(_SCORERS[method.name](g, method, maps, shapes, output_size))
    score, anomaly_map = results[0]
    if footings:
        score = _fuse(g, [s for s, _ in results], footings, 'image')
        anomaly_map = None if anomaly_map is None else _fuse(g, [m for _, m in results], footings, 'pixel')
    g.op('Identity', [score], name='score')
    g.op('GreaterOrEqual', [score, g.const(np.float32(threshold))], name='anomaly')
    outputs = [helper.make_tensor_value_info('score', TensorProto.FLOAT, ['N']),
               helper.make_tensor_value_info('anomaly', TensorProto.BOOL, ['N'])]
    if anomaly_map is not None:
        g.op('Identity', [anomaly_map], name='anomaly_map')
        outputs.insert(1, helper.make_tensor_value_info('anomaly_map', TensorProto.FLOAT,
                                                        ['N', output_size, output_size]))
    inputs = [helper.make_tensor_value_info('image', TensorProto.UINT8, ['N', height, width, 3])]
    graph = helper.make_graph(g.nodes, 'mahalanobisad', inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)], producer_name='mahalanobisad')
    model.ir_version = max(8, backbone.ir_version)
    helper.set_model_props(model, {str(k): str(v) for k, v in (metadata or {}).items()})
    return model


def _fuse(g, values, footings, kind):
    """fusion.fuse: the largest over scales of a_s x_s + b_s (Footing.affine)."""
    terms = []
    for value, footing in zip(values, footings):
        a, b = footing.affine(kind)
        terms.append(g.op('Add', [g.op('Mul', [value, g.const(np.float32(a))]), g.const(np.float32(b))]))
    return g.op('Max', terms)


def view_model(height, width, resize_size, crop_size, training_size=None):
    """A model with only the preprocessing: image (N, height, width, 3) uint8 -> view (N, S, S, 3)
    uint8, which must equal image_utils.network_view (of image_utils.to_training_size's image; the
    tests compare them pixel for pixel)."""
    g = _Graph(MIN_OPSET)
    view = _add_view(g, *_add_planes(g, 'image', height, width, training_size), resize_size, crop_size)
    g.op('Transpose', [g.op('Cast', [view], to=TensorProto.UINT8)], perm=[0, 2, 3, 1], name='view')
    graph = helper.make_graph(g.nodes, 'view', [helper.make_tensor_value_info('image', TensorProto.UINT8,
                                                                             ['N', height, width, 3])],
                              [helper.make_tensor_value_info('view', TensorProto.UINT8, ['N', crop_size, crop_size, 3])],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', MIN_OPSET)])
    model.ir_version = 8
    return model


def save_model(model, path):
    """Write an ONNX model atomically (one file; protobuf's 2 GiB limit applies)."""
    data = model.SerializeToString()
    atomic_write_bytes(path, data)
    return len(data)


def export_size(meta, size=None):
    """(width, height) the exported model takes: `size`, or the size the training images share
    (UsageError when they differ or the feature file does not record it)."""
    if size is None:
        size = meta.get('train_image_size')
        if size is None:
            reason = ('the training images differ in size' if 'train_image_size' in meta
                      else 'the feature file does not record the training images\' size')
            raise UsageError(f'{reason}: give the size of the images to score (--export_size W H)')
    width, height = size
    if min(width, height) < 1:
        raise UsageError(f'export size must be positive, got {width} x {height}')
    return int(width), int(height)


def export_detector(detector, path, size=None, version=''):
    """Write the model of a fitted detector.Detector for images of `size` (width, height; see
    export_size) to `path` (atomically) -> bytes written. metadata_props (text): the thresholds and
    their source, backbone, method and options, input sizes and export size, training set, the tool's
    version (docs/deploying.md)."""
    spec, extractor, meta = detector.spec, detector.extractor, detector.meta_
    size = export_size(meta, size)
    scales = []
    for input_size, method in zip(detector.input_sizes, detector.methods_):
        probe = np.zeros((1, 3, input_size, input_size), np.float32)
        shapes = [m.shape[1:] for m in extractor.session.run(extractor.output_names, {extractor.input_name: probe})]
        scales.append((input_size, method, shapes))
    settings = detector.settings()
    metadata = {'threshold': repr(float(detector.threshold_)), 'threshold_source': detector.threshold_source_,
                'backbone': spec.name, 'model': meta.get('model', ''), 'method': detector.method_.name,
                'method_options': json.dumps(meta.get('method_options', {}), sort_keys=True),
                'input_size': json.dumps(settings['input_size']), 'resize_size': json.dumps(settings['resize_size']),
                'image_width': size[0], 'image_height': size[1], 'n_train_images': meta.get('n_train_images', ''),
                'train_dir': meta.get('train_dir') or '', 'int8': str(detector.int8_backbone_ is not None).lower(),
                'tool': 'mahalanobisad', 'version': version}
    if detector.pixel_threshold_ is not None:
        metadata['pixel_threshold'] = repr(float(detector.pixel_threshold_))
    backbone = extractor.onnx_path if detector.int8_backbone_ is None else detector.int8_backbone_
    model = build_model(spec, backbone, scales, size, detector.threshold_, metadata, detector.footings_,
                        meta.get('train_image_size'))
    size_bytes = save_model(model, path)
    logger.info('exported %s to %s (%.1f MB; input %d x %d RGB, threshold %.3f from %s)', detector.method_.name,
                path, size_bytes / 2 ** 20, size[0], size[1], detector.threshold_, detector.threshold_source_)
    return size_bytes
