"""int8 backbones: onnxruntime's static quantization of the backbone, calibrated on the product.

EfficientNet-Lite was designed for 8-bit inference (ReLU6, no squeeze-excitation). `quantize_backbone`
runs onnxruntime.quantization.quantize_static on the backbone graph exactly as FeatureExtractor runs it
(pooled outputs rewritten to maps), calibrated on the network views of a seeded sample of the training
images (`calibration_sample`), and returns the quantized graph as bytes: the feature file stores them
(Detector, feature_file), so a later run uses exactly this graph, never a re-calibrated one.

The choices, each measured on lite0 (docs/speed.md, "int8 backbone"):
- QDQ format (QuantizeLinear / DequantizeLinear pairs around float operators): standard ONNX operators,
  so the exported detector inlines the int8 backbone as it is; onnxruntime fuses the pairs into QLinearConv
  at session creation, as fast as the QOperator format (whose QLinearAdd is a com.microsoft operator).
- int8 weights per output channel: per-tensor scales ruin the depthwise convolutions (the features'
  mean relative error 3-4 times larger), at the same speed.
- uint8 activations, min-max ranges over CALIBRATION_IMAGES views.
- FLOAT_NODES stay float32.
"""
import contextlib
import functools
import hashlib
import logging
import os
import tempfile

import numpy as np
import onnxruntime
from onnxruntime import quantization

import model_utils

logger = logging.getLogger('mahalanobisad')

CALIBRATION_IMAGES = 32   # training views the activation ranges are measured on
CALIBRATION_BATCH = 8     # views per calibration run
FLOAT_NODES = ()          # backbone nodes left in float32
PER_CHANNEL = True
CALIBRATE_METHOD = quantization.CalibrationMethod.MinMax
SETTINGS = {'format': 'QDQ', 'weights': 'int8, per channel', 'activations': 'uint8', 'calibration': 'MinMax'}


def calibration_sample(n_images, seed, count=CALIBRATION_IMAGES):
    """Indices (sorted) of the training images whose views calibrate the activation ranges: a seeded
    sample of `count` of the n_images (all of them when there are fewer)."""
    if n_images <= count:
        return np.arange(n_images)
    return np.sort(np.random.default_rng([seed, n_images]).choice(n_images, count, replace=False))


class _Batches(quantization.CalibrationDataReader):
    def __init__(self, input_name, tensors):
        self.batches = iter([{input_name: tensors[i:i + CALIBRATION_BATCH]}
                             for i in range(0, len(tensors), CALIBRATION_BATCH)])

    def get_next(self):
        return next(self.batches, None)


def quantize_backbone(onnx_path, tensors):
    """The backbone at `onnx_path`, statically quantized (module docstring) with activation ranges
    measured on `tensors` (N, 3, S, S) float32, normalised network inputs -> the model, serialized
    (bytes)."""
    model, _ = model_utils.feature_graph(onnx_path)
    initializers = {i.name for i in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in initializers)
    logger.info('quantizing %s to int8 (calibrated on %d training views)', os.path.basename(onnx_path), len(tensors))
    with tempfile.TemporaryDirectory() as folder, _quiet_root_logger():
        path = os.path.join(folder, 'int8.onnx')
        quantization.quantize_static(
            model, path, _Batches(input_name, tensors), quant_format=quantization.QuantFormat.QDQ,
            per_channel=PER_CHANNEL, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, nodes_to_exclude=list(FLOAT_NODES),
            calibrate_method=CALIBRATE_METHOD)
        with open(path, 'rb') as f:
            return f.read()


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs on the root logger (a line per weight scale it adjusts, advice to
    pre-process the model): those records are dropped while it runs. Records of named loggers pass
    (a logger's filters see only what is logged on it)."""
    drop = logging.Filter('no record has this name')
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def settings(n_calibration):
    """What the feature file records of how its int8 backbone was made (besides its sha256 and size)."""
    return dict(SETTINGS, float_nodes=list(FLOAT_NODES), calibration_images=int(n_calibration),
                onnxruntime=onnxruntime.__version__)


def sha256(model_bytes):
    return hashlib.sha256(model_bytes).hexdigest()


@functools.lru_cache(maxsize=4)
def open_quantized(model_bytes, provider=None):
    """A FeatureExtractor on a quantized backbone (bytes), opened once per process."""
    return model_utils.FeatureExtractor(model_bytes, provider, name='the int8 backbone')
