"""The exported ONNX model scores like the tool: view pixels, scores, maps and verdicts, in this
process, in a plain onnxruntime subprocess and in onnxruntime-node."""
import glob
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import anomaly_model
import export_onnx
import image_utils
import mahalanobisad
import model_utils
from tests.conftest import REPO

NODE_DIR = os.path.join(REPO, 'deploy', 'node')
SAMPLE = sorted(glob.glob(os.path.join(REPO, 'images', '*.png')))


@pytest.mark.parametrize('height, width', [
    (256, 256),    # no resize: crop only
    (900, 900),    # INTER_AREA, non-integer ratio (MVTec bottle)
    (320, 240),    # INTER_AREA, portrait, odd crop offsets
    (1000, 700),
    (512, 768),    # INTER_AREA, integer ratio 2 (OpenCV's 2x2 path)
    (768, 768),    # integer ratio 3
    (200, 300),    # INTER_LINEAR, enlarging
    (99, 130),
    (128, 128),    # enlarging by exactly 2
])
def test_view_equals_opencv_pixel_for_pixel(height, width):
    images = np.random.default_rng(height * width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    session = ort.InferenceSession(export_onnx.view_model(height, width, 256, 224).SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    view = session.run(None, {'image': images})[0]
    expected = np.stack([image_utils.network_view(image, 256, 224) for image in images])
    assert view.shape == expected.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(view, expected)


def test_smoothing_matrix_equals_upsample_and_smooth():
    grids = np.random.default_rng(3).random((3, 14, 14)).astype(np.float32) * 10
    k = export_onnx.smoothing_matrix(14, 224)
    np.testing.assert_allclose(k @ grids @ k.T, anomaly_model.upsample_and_smooth(grids, 224), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def backbone(model_dir):
    spec, onnx_path = model_utils.resolve_model('lite0', model_dir)
    return spec, onnx_path, model_utils.FeatureExtractor(onnx_path)


@pytest.fixture(scope='module')
def train_maps(backbone, small_train):
    spec, _, extractor = backbone
    views = [image_utils.load_view(p, spec.resize_size, spec.input_size)[0]
             for p in image_utils.list_images(small_train)]
    return extractor(np.stack([image_utils.to_tensor(v, spec.mean, spec.std) for v in views]))


@pytest.fixture(scope='module')
def sized_inputs(tmp_path_factory):
    """The sample test images at their own 256 x 256 and enlarged to 900 x 900 (the MVTec bottle
    size), written losslessly so the tool decodes the same pixels the model is given."""
    folder = tmp_path_factory.mktemp('sized')
    inputs = {(256, 256): SAMPLE[::3]}
    paths = []
    for path in SAMPLE[::3]:
        big = cv2.resize(cv2.imread(path), (900, 900), interpolation=cv2.INTER_CUBIC)
        paths.append(str(folder / os.path.basename(path)))
        cv2.imwrite(paths[-1], big)
    inputs[(900, 900)] = paths
    return inputs


def fitted(name, backbone, train_maps):
    spec, _, _ = backbone
    method = anomaly_model.make_method(name, padim_dims=60, spade_k=4, coreset_ratio=0.2)
    mahalanobisad.configure(method, train_maps, spec)
    return method.fit(method.features(train_maps))


def export(method, backbone, train_maps, size, threshold, path):
    spec, onnx_path, _ = backbone
    shapes = [m.shape[1:] for m in train_maps]
    model = export_onnx.build_model(spec, onnx_path, method, shapes, size, threshold,
                                    {'method': method.name, 'threshold': threshold})
    export_onnx.save_model(model, str(path))
    return str(path)


def run_model(path, paths):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'image': np.stack([image_utils.load_image(p) for p in paths])})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


@pytest.mark.parametrize('name', list(anomaly_model.METHODS))
def test_exported_model_scores_like_the_tool(name, backbone, train_maps, sized_inputs, tmp_path, monkeypatch):
    spec, _, extractor = backbone
    monkeypatch.setattr(export_onnx, 'BANK_CHUNK', 500)  # PatchCore: a bank of ~1900 rows in 4 blocks
    method = fitted(name, backbone, train_maps)
    for size, paths in sized_inputs.items():
        tool = list(mahalanobisad.score_images(paths, extractor, spec, method))
        scores = np.array([t.score for t in tool])
        threshold = float(np.median(scores))  # half the images on each side of it
        out = run_model(export(method, backbone, train_maps, size, threshold, tmp_path / f'{name}.onnx'), paths)
        assert out['score'].dtype == np.float32 and out['score'].shape == (len(paths),)
        np.testing.assert_allclose(out['score'], scores, rtol=1e-4)
        near = np.abs(scores - threshold) <= 1e-4 * abs(threshold)
        np.testing.assert_array_equal(out['anomaly'][~near], (scores >= threshold)[~near])
        maps = np.stack([t.anomaly_map for t in tool])
        assert out['anomaly_map'].shape == maps.shape == (len(paths), 224, 224)
        np.testing.assert_allclose(out['anomaly_map'], maps, atol=1e-3 * np.abs(maps).max())


@pytest.fixture(scope='module')
def padim_export(backbone, train_maps, tmp_path_factory):
    """A PaDiM model for the sample's 256 x 256 images and its scores in this process."""
    method = fitted('padim', backbone, train_maps)
    path = export(method, backbone, train_maps, (256, 256), 100.0, tmp_path_factory.mktemp('padim') / 'padim.onnx')
    return path, run_model(path, SAMPLE)['score']


def test_plain_onnxruntime_in_a_subprocess_needs_nothing_from_this_project(padim_export, tmp_path):
    path, expected = padim_export
    script = (
        'import importlib.util, json, sys\n'
        'import cv2, onnxruntime as ort\n'
        'assert importlib.util.find_spec("anomaly_model") is None, "the project is importable"\n'
        's = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])\n'
        'scores = [float(s.run(["score"], {"image": cv2.imread(p)[None, ..., ::-1].copy()})[0][0]) for p in sys.argv[2:]]\n'
        'assert not any(m in sys.modules for m in ("anomaly_model", "export_onnx", "mahalanobisad"))\n'
        'print(json.dumps(scores))\n')
    # -I: isolated mode (no PYTHONPATH, no script folder on sys.path); cwd outside the repository.
    done = subprocess.run([sys.executable, '-I', '-c', script, path, *SAMPLE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(json.loads(done.stdout), expected, rtol=1e-6)


def test_onnxruntime_node_scores_like_python(padim_export):
    if shutil.which('node') is None:
        pytest.skip('Node.js is not installed: the onnxruntime-node check needs it')
    assert os.path.isdir(os.path.join(NODE_DIR, 'node_modules', 'onnxruntime-node')), \
        'onnxruntime-node missing: run `npm ci --ignore-scripts` in deploy/node (as .ci/run does)'
    path, expected = padim_export
    done = subprocess.run(['node', os.path.join(NODE_DIR, 'score.js'), path, *SAMPLE],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r['path'] for r in results] == SAMPLE
    np.testing.assert_allclose([r['score'] for r in results], expected, rtol=1e-5)
    assert [r['anomaly'] for r in results] == [bool(s >= 100.0) for s in expected]


def test_metadata_and_contract(padim_export):
    path, _ = padim_export
    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    assert props['method'] == 'padim' and float(props['threshold']) == 100.0
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [('image', 'tensor(uint8)', [256, 256, 3])]
    assert [o.name for o in session.get_outputs()] == ['score', 'anomaly_map', 'anomaly']
    with pytest.raises(Exception, match='dimensions'):
        session.run(None, {'image': np.zeros((1, 300, 256, 3), np.uint8)})
