"""The backbone's ONNX graph: written from an EfficientNet-Lite state dict, and read with its pooled outputs
turned back into the maps they pool.

- `build_efficientnet_onnx`: lite0/1/2's graph from the state dict model_utils.read_torch_checkpoint
  reads (once per model: model_utils.resolve_model keeps the file);
- `feature_graph` / `expose_spatial_outputs`: a graph whose outputs are globally pooled (the ailia
  sample's b0..b7) rewritten so that they return the (N, C, H, W) maps: what FeatureExtractor runs, what
  quantize.py quantizes and what export_onnx.py inlines.

This module, export_onnx.py and quantizing are what need the onnx package; its import takes 0.6-0.9 s
(its ml_dtypes extension), so model_utils imports this module only to convert a checkpoint or to
rewrite a pooled graph, and scoring with a converted backbone never imports onnx.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from errors import ModelError

# Stride of the first block of each of the 7 EfficientNet stages (the same for b0..b7 and lite0..4).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
BN_EPSILON = 1e-3  # TF EfficientNet's batch-norm epsilon, kept by the lukemelas port


class _GraphBuilder:
    def __init__(self, state_dict):
        self.state_dict = state_dict
        self.nodes, self.initializers = [], []

    def constant(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def conv_bn(self, x, conv, bn, out, stride=1, groups=1, relu6=True):
        """Conv2d (TF 'same' padding) with its batch norm folded into weight and bias."""
        weight = self.state_dict[conv + '.weight'].astype(np.float64)
        gamma, beta, mean, var = (self.state_dict[f'{bn}.{k}'].astype(np.float64)
                                  for k in ('weight', 'bias', 'running_mean', 'running_var'))
        scale = gamma / np.sqrt(var + BN_EPSILON)
        w = self.constant(conv + '.w', weight * scale[:, None, None, None])
        b = self.constant(conv + '.b', beta - mean * scale)
        k = weight.shape[-1]
        # SAME_UPPER puts the odd padding pixel at the end, exactly as TF's 'SAME' does.
        y = out if not relu6 else out + '.pre'
        self.nodes.append(helper.make_node('Conv', [x, w, b], [y], name=conv, kernel_shape=[k, k],
                                           strides=[stride, stride], group=groups, auto_pad='SAME_UPPER'))
        if relu6:
            self.nodes.append(helper.make_node('Clip', [y, 'zero', 'six'], [out], name=conv + '.relu6'))
        return out


def _efficientnet_blocks(state_dict):
    """Group the state dict's MBConv blocks into stages: [(stage, block index, stride), ...].

    A stage starts where the block output width changes (true for every EfficientNet stage).
    """
    n_blocks = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('_blocks.'))
    blocks, stage, previous_width = [], -1, None
    for i in range(n_blocks):
        width = state_dict[f'_blocks.{i}._project_conv.weight'].shape[0]
        first = width != previous_width
        stage += first
        if stage >= len(STAGE_STRIDES):
            raise ModelError('state dict has more than 7 EfficientNet stages')
        blocks.append((stage, i, STAGE_STRIDES[stage] if first else 1))
        previous_width = width
    if stage != len(STAGE_STRIDES) - 1:
        raise ModelError(f'state dict has {stage + 1} EfficientNet stages, expected 7')
    return blocks


FEATURE_NAMES = ('stem',) + tuple(f'stage{i}' for i in range(1, 8)) + ('head',)


def build_efficientnet_onnx(state_dict, name):
    """ONNX graph of an EfficientNet(-Lite) feature extractor from its lukemelas state dict.

    Input 'input' (N, 3, H, W) float32, normalised. Outputs, in order: the stem, the end of each
    of the 7 stages and the head conv (after its activation), each (N, C, h, w). Lite models use
    ReLU6 and no squeeze-excitation; a state dict with SE weights is refused (b0..b7 come as ONNX).
    """
    if any('_se_reduce' in k for k in state_dict):
        raise ModelError('state dict has squeeze-excitation layers: only EfficientNet-Lite is converted')
    g = _GraphBuilder(state_dict)
    g.initializers += [numpy_helper.from_array(np.array(0, np.float32), 'zero'),
                       numpy_helper.from_array(np.array(6, np.float32), 'six')]
    x = g.conv_bn('input', '_conv_stem', '_bn0', 'stem', stride=2)
    blocks = _efficientnet_blocks(state_dict)
    last_block_of_stage = {stage: i for stage, i, _ in blocks}
    for stage, i, stride in blocks:
        p = f'_blocks.{i}'
        block_input = x
        if p + '._expand_conv.weight' in state_dict:
            in_width = state_dict[p + '._expand_conv.weight'].shape[1]
            x = g.conv_bn(x, p + '._expand_conv', p + '._bn0', p + '.expand')
        else:
            in_width = state_dict[p + '._depthwise_conv.weight'].shape[0]
        channels = state_dict[p + '._depthwise_conv.weight'].shape[0]
        x = g.conv_bn(x, p + '._depthwise_conv', p + '._bn1', p + '.dw', stride=stride, groups=channels)
        out = f'stage{stage + 1}' if last_block_of_stage[stage] == i else p + '.out'
        skip = stride == 1 and in_width == state_dict[p + '._project_conv.weight'].shape[0]
        x = g.conv_bn(x, p + '._project_conv', p + '._bn2', out + '.proj' if skip else out, relu6=False)
        if skip:
            g.nodes.append(helper.make_node('Add', [x, block_input], [out], name=p + '.skip'))
            x = out
    g.conv_bn(x, '_conv_head', '_bn1', 'head')

    inputs = [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['N', 3, 'H', 'W'])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ['N', None, None, None]) for n in FEATURE_NAMES]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)],
                              producer_name='mahalanobisad')
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model


def expose_spatial_outputs(model):
    """Rewrite an onnx.ModelProto so that globally pooled outputs return the maps they pool.

    An output made by GlobalAveragePool, or by ReduceMean over the spatial axes (possibly followed by
    Flatten/Reshape/Squeeze), is replaced by that node's input, a (N, C, H, W) map: its global
    average is the same feature, and the map localises. Returns the number of outputs rewritten.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name: i for i in model.graph.initializer}
    rewritten = 0
    for output in model.graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type in ('Flatten', 'Reshape', 'Squeeze'):
            node = producers.get(node.input[0])
        if node is None or not _is_spatial_mean(node, initializers):
            continue
        spatial = node.input[0]
        output.CopyFrom(helper.make_tensor_value_info(spatial, TensorProto.FLOAT, None))
        rewritten += 1
    return rewritten


def _is_spatial_mean(node, initializers):
    if node.op_type == 'GlobalAveragePool':
        return True
    if node.op_type != 'ReduceMean':
        return False
    axes = next((list(a.ints) for a in node.attribute if a.name == 'axes'), None)
    if axes is None and len(node.input) > 1 and node.input[1] in initializers:  # opset >= 18
        axes = numpy_helper.to_array(initializers[node.input[1]]).tolist()
    return axes is not None and {a % 4 for a in axes} == {2, 3}


def feature_graph(onnx_model):
    """The backbone as FeatureExtractor runs it: the onnx.ModelProto of an ONNX file's path or of a
    serialized model (bytes), pooled outputs rewritten to the maps they pool -> (model, number of
    outputs rewritten)."""
    model = onnx.load_model_from_string(onnx_model) if isinstance(onnx_model, bytes) else onnx.load(onnx_model)
    return model, expose_spatial_outputs(model)
