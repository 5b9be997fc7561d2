"""int8 backbones: onnxruntime's static quantization of the backbone, calibrated on the product.

EfficientNet-Lite was designed for 8-bit inference (ReLU6, no squeeze-excitation). `quantize_backbone`
runs onnxruntime.quantization.quantize_static on the backbone graph exactly as FeatureExtractor runs it
(pooled outputs rewritten to maps), calibrated on the network views of a seeded sample of the training
images (`calibration_sample`), and returns the quantized graph as bytes: the feature file stores them
(Detector, feature_file), so a later run uses exactly this graph, never a re-calibrated one.

The choices, each measured on lite0 (docs/speed.md, "int8 backbone": the figures and the commands):
- QDQ format (QuantizeLinear / DequantizeLinear pairs around float operators): standard ONNX operators,
  so the exported detector inlines the int8 backbone as it is; onnxruntime fuses the pairs into
  QLinearConv at session creation: the same speed and features as the QOperator format, whose
  QLinearAdd is a com.microsoft operator.
- int8 weights per output channel: per-tensor scales ruin the depthwise convolutions (3 times the
  features' error), at the same speed.
- uint8 activations, min-max ranges: Percentile (99.999%) calibration gave 5% more error and took 3x
  as long.
- up to CALIBRATION_IMAGES views, so every training image of a typical product folder (MVTec's hold 60
  to 391): calibrated on a sample of 32, the AUROCs moved with the sample drawn (metal_nut PatchCore's
  image AUROC 0.0059 below float32's with the seed-0 sample), while the whole training set leaves
  nothing to chance. MinMax keeps only each run's minima and maxima, so memory does not grow with the
  views; the time does (33 s for 220 views at load average 10), once, at fit time.
- FLOAT_NODES stay float32: quantizing EfficientNet-Lite's stem and first block doubled the error of
  every later feature map, for 13% of the int8 speed.
"""
import contextlib
import functools
import hashlib
import logging
import os
import tempfile

import numpy as np
import onnxruntime

import model_utils
from errors import ModelError

logger = logging.getLogger('mahalanobisad')

CALIBRATION_IMAGES = 256  # training views the activation ranges are measured on (module docstring)
CALIBRATION_BATCH = 8     # views per calibration run (MinMax keeps each run's minima and maxima, not its activations)
# Left in float32: EfficientNet-Lite's stem and first block (three convolutions at 112 x 112, 5% of
# the multiply-adds). Quantized, they doubled the error of every later feature map (module docstring).
FLOAT_NODES = ('_conv_stem', '_conv_stem.relu6', '_blocks.0._depthwise_conv', '_blocks.0._depthwise_conv.relu6',
               '_blocks.0._project_conv')


def calibration_sample(n_images, seed, count=CALIBRATION_IMAGES):
    """Indices (sorted) of the training images whose views calibrate the activation ranges: a seeded
    sample of `count` of the n_images (all of them when there are fewer)."""
    if n_images <= count:
        return np.arange(n_images)
    return np.sort(np.random.default_rng([seed, n_images]).choice(n_images, count, replace=False))


def quantize_backbone(onnx_path, tensors, float_nodes=FLOAT_NODES, per_channel=True, quant_format='QDQ',
                      calibration='MinMax'):
    """The backbone at `onnx_path`, statically quantized with activation ranges measured on `tensors`
    (N, 3, S, S) float32, normalised network inputs -> (the model, serialized (bytes); what made it:
    {format, weights, activations, calibration, calibration_images, float_nodes, onnxruntime}).
    ModelError (one line) where onnxruntime cannot quantize the graph.

    The defaults are the tool's choices (module docstring); benchmarks/int8_choices.py measures the
    others: float_nodes (names of nodes left in float32; those the graph lacks are ignored), per_channel
    (weight scales per output channel, else per tensor), quant_format ('QDQ' or 'QOperator'),
    calibration ('MinMax' or 'Percentile')."""
    # Imported here: they import onnx (0.6-0.9 s), which scoring with a stored int8 backbone
    # (open_quantized) does not need.
    from onnxruntime import quantization

    import backbone_graph

    class Batches(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: tensors[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(tensors), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    model, _ = backbone_graph.feature_graph(onnx_path)
    initializers = {i.name for i in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in initializers)
    float_nodes = [node.name for node in model.graph.node if node.name in float_nodes]
    logger.info('quantizing %s to int8 (calibrated on %d training views)', os.path.basename(onnx_path), len(tensors))
    with tempfile.TemporaryDirectory() as folder, _quiet_root_logger():
        path = os.path.join(folder, 'int8.onnx')
        try:
            quantization.quantize_static(
                model, path, Batches(), quant_format=quantization.QuantFormat[quant_format],
                per_channel=per_channel, activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8, nodes_to_exclude=float_nodes,
                calibrate_method=quantization.CalibrationMethod[calibration])
        except Exception as e:  # onnxruntime.quantization raises many unrelated types
            raise ModelError(f'cannot quantize {os.path.basename(onnx_path)} to int8: '
                             f'{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}') from None
        with open(path, 'rb') as f:
            model_bytes = f.read()
    weights = 'int8, per output channel' if per_channel else 'int8, per tensor'
    return model_bytes, {'format': quant_format, 'weights': weights, 'activations': 'uint8', 'calibration': calibration, 'calibration_images': len(tensors),
                         'float_nodes': float_nodes, 'onnxruntime': onnxruntime.__version__}


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


def sha256(model_bytes):
    return hashlib.sha256(model_bytes).hexdigest()


@functools.lru_cache(maxsize=4)
def open_quantized(model_bytes, provider=None):
    """A FeatureExtractor on a quantized backbone (bytes), opened once per process."""
    return model_utils.FeatureExtractor(model_bytes, provider, name='the int8 backbone')
