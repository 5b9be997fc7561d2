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
import feature_maps
import image_utils
import mahalanobisad
import nearest_neighbours
from detector import Detector
from tests.conftest import REPO

NODE_DIR = os.path.join(REPO, 'deploy', 'node')
SAMPLE = sorted(glob.glob(os.path.join(REPO, 'images', '*.png')))


@pytest.mark.parametrize('height, width, training_size', [
    (256, 256, None),          # no resize: crop only
    (900, 900, None),          # INTER_AREA, non-integer ratio (MVTec bottle)
    (320, 240, None),          # INTER_AREA, portrait, odd crop offsets
    (1000, 700, None),
    (512, 768, None),          # INTER_AREA, integer ratio 2 (OpenCV's 2x2 path)
    (768, 768, None),          # integer ratio 3
    (200, 300, None),          # INTER_LINEAR, enlarging
    (99, 130, None),
    (128, 128, None),          # enlarging by exactly 2
    (900, 900, (320, 320)),    # brought to the training images' size first: INTER_AREA (MVTec bottle's copy)
    (1000, 700, (350, 500)),   # integer ratio 2 to the training size, then INTER_AREA
    (768, 768, (192, 192)),    # integer ratio 4, then INTER_LINEAR to 256
    (301, 200, (400, 602)),    # enlarged to the training size (aspect ratio within a pixel)
    (600, 400, (300, 200)),    # another aspect ratio: left as it is
])
def test_view_equals_opencv_pixel_for_pixel(height, width, training_size):
    images = np.random.default_rng(height * width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    session = ort.InferenceSession(export_onnx.view_model(height, width, 256, 224, training_size).SerializeToString(),
                                   providers=['CPUExecutionProvider'])
    view = session.run(None, {'image': images})[0]
    expected = np.stack([image_utils.network_view(image_utils.to_training_size(image, training_size), 256, 224)
                         for image in images])
    assert view.shape == expected.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(view, expected)


def test_smoothing_matrix_equals_upsample_and_smooth():
    grids = np.random.default_rng(3).random((3, 14, 14)).astype(np.float32) * 10
    k = feature_maps.smoothing_matrix(14, 224)
    np.testing.assert_allclose(k @ grids @ k.T, feature_maps.upsample_and_smooth(grids, 224), rtol=1e-5, atol=1e-5)


OPTIONS = {'padim_dims': 60, 'spade_k': 4, 'coreset_ratio': 0.2}


@pytest.fixture(scope='module')
def fitted(small_train, model_dir):
    """One fitted detector per method."""
    paths = image_utils.list_images(small_train)
    return {name: Detector(method=name, model_dir=model_dir, **OPTIONS).fit(paths) for name in anomaly_model.METHODS}


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


def run_model(path, paths):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'image': np.stack([image_utils.load_image(p) for p in paths])})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


@pytest.mark.parametrize('name', list(anomaly_model.METHODS))
def test_exported_model_scores_like_the_tool(name, fitted, sized_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, 'BANK_CHUNK', 500)  # PatchCore: a bank of ~1900 rows in 4 blocks
    detector = fitted[name]
    for size, paths in sized_inputs.items():
        tool = list(detector.inspect(paths))
        scores = np.array([t.score for t in tool])
        detector.set_threshold(float(np.median(scores)), 'test')  # half the images on each side of it
        path = str(tmp_path / f'{name}.onnx')
        detector.export(path, size)
        out = run_model(path, paths)
        assert out['score'].dtype == np.float32 and out['score'].shape == (len(paths),)
        np.testing.assert_allclose(out['score'], scores, rtol=1e-4)
        near = np.abs(scores - detector.threshold_) <= 1e-4 * abs(detector.threshold_)
        np.testing.assert_array_equal(out['anomaly'][~near], (scores >= detector.threshold_)[~near])
        maps = np.stack([t.anomaly_map for t in tool])
        assert out['anomaly_map'].shape == maps.shape == (len(paths), 224, 224)
        np.testing.assert_allclose(out['anomaly_map'], maps, atol=1e-3 * np.abs(maps).max())


def test_exported_patchcore_searches_the_index_like_the_tool(fitted, tmp_path):
    """The tool's PatchCore searches an inverted-file index (the fixture's bank of ~1900 rows has 48
    lists): probing one list instead of 8 makes its answers far from the exact search, and the
    export must follow the index, not the exact search."""
    method = fitted['patchcore'].method_
    assert len(method.centroids_) > nearest_neighbours.IVF_PROBES
    default_index = method.index_
    method.index_ = nearest_neighbours.NearestPatchIndex(method.bank_, method.centroids_, probes=1)
    try:
        detector = fitted['patchcore']
        tool = list(detector.inspect(SAMPLE))
        scores = np.array([t.score for t in tool])
        method.exact_search = True
        exact = np.array([t.score for t in detector.inspect(SAMPLE)])
        method.exact_search = False
        assert np.abs(scores / exact - 1).max() > 1e-2  # the index's answers differ from the exact ones
        path = str(tmp_path / 'patchcore.onnx')
        detector.set_threshold(float(np.median(scores)), 'test').export(path)
        out = run_model(path, SAMPLE)
        np.testing.assert_allclose(out['score'], scores, rtol=1e-4)
        maps = np.stack([t.anomaly_map for t in tool])
        np.testing.assert_allclose(out['anomaly_map'], maps, atol=1e-3 * np.abs(maps).max())
    finally:
        method.index_, method.exact_search = default_index, False


def test_exported_patchcore_falls_back_to_the_exact_search_where_probed_lists_are_empty(fitted, tmp_path):
    """Inverted lists centred on the most anomalous sample patches hold no bank row; probing one list,
    those patches find nothing in the index, and the tool and the export both fall back to the
    exact nearest patch."""
    detector = fitted['patchcore']
    method = detector.method_
    views = [detector.preprocessing.views(path)[0][0] for path in SAMPLE]
    patches = method.features(detector.extractor(detector.preprocessing.tensors(views)))['patches']
    queries = patches.reshape(-1, patches.shape[-1])
    farthest = queries[np.argsort(-nearest_neighbours.nearest_distances(queries, method.bank_)[0])[:4]]
    default_index = method.index_
    method.index_ = nearest_neighbours.NearestPatchIndex(method.bank_, np.concatenate([method.centroids_, farthest]), probes=1)
    try:
        assert (np.bincount(method.index_.row_lists(), minlength=len(method.index_.centroids))[-4:] == 0).any()
        assert (method.index_.index.search(farthest, 1)[1] < 0).any()  # nothing found: the tool's fallback
        scores = np.array([t.score for t in detector.inspect(SAMPLE)])
        path = str(tmp_path / 'patchcore.onnx')
        detector.set_threshold(float(np.median(scores)), 'test').export(path)
        np.testing.assert_allclose(run_model(path, SAMPLE)['score'], scores, rtol=1e-4)
    finally:
        method.index_ = default_index


@pytest.fixture(scope='module')
def padim_export(fitted, tmp_path_factory):
    """A PaDiM model for the sample's 256 x 256 images (the training images' size, the default) and
    its scores in this process."""
    path = str(tmp_path_factory.mktemp('padim') / 'padim.onnx')
    fitted['padim'].set_threshold(100.0, 'test').export(path)
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
    assert props['method'] == 'padim' and float(props['threshold']) == 100.0 and props['threshold_source'] == 'test'
    assert (props['image_width'], props['image_height'], props['input_size']) == ('256', '256', '224')
    assert props['backbone'] == 'efficientnet-lite0' and props['n_train_images'] == '12'
    assert float(props['pixel_threshold']) > 0 and props['version']
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [('image', 'tensor(uint8)', [256, 256, 3])]
    assert [o.name for o in session.get_outputs()] == ['score', 'anomaly_map', 'anomaly']
    with pytest.raises(Exception, match='dimensions'):
        session.run(None, {'image': np.zeros((1, 300, 256, 3), np.uint8)})


def test_cli_export_fits_decides_thresholds_exports_and_scores_nothing(tmp_path, small_train, model_dir):
    model, feat, report = str(tmp_path / 'line3.onnx'), str(tmp_path / 'f.pkl'), str(tmp_path / 'r.json')
    labelled = ['--test_dir', os.path.join(REPO, 'images'), '--gt_dir', os.path.join(REPO, 'gt_masks')]
    assert mahalanobisad.run(['-tr', small_train, '--method', 'padim', '--padim_dims', '60', '-f', feat, *labelled,
                              '--export', model, '--model_dir', model_dir, '-s', str(tmp_path / 'out')]) == 0
    assert sorted(os.listdir(tmp_path)) == ['f.pkl', 'line3.onnx']  # no figures, no JSON
    props = {p.key: p.value for p in onnx.load(model).metadata_props}
    assert props['threshold_source'].startswith('F1-optimal') and props['image_width'] == '256'
    assert mahalanobisad.run(['-tr', small_train, '--method', 'padim', '-f', feat, *labelled, '-i', SAMPLE[0],
                              '--no_figures', '--json', report, '--model_dir', model_dir]) == 0
    with open(report) as f:
        assert float(props['threshold']) == json.load(f)['threshold']  # what the CLI decides, it exports
    # reusing the feature file: another export size, and scoring when -i is given
    assert mahalanobisad.run(['-tr', small_train, '--method', 'padim', '-f', feat, '--threshold', props['threshold'],
                              '--export', model, '--export_size', '300', '200', '-i', SAMPLE[0], '--no_figures',
                              '--json', report, '--model_dir', model_dir]) == 0
    session = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[1:] == [200, 300, 3]
    with open(report) as f:
        assert [r['path'] for r in json.load(f)['images']] == [SAMPLE[0]]


def test_cli_export_errors_are_one_line(tmp_path, small_train, model_dir, capsys):
    mixed = tmp_path / 'mixed'
    shutil.copytree(small_train, mixed)
    cv2.imwrite(str(mixed / 'wide.png'), cv2.resize(cv2.imread(SAMPLE[0]), (300, 256)))
    common = ['--method', 'padim', '--padim_dims', '20', '--model_dir', model_dir, '--threshold', '1']
    for argv, message in [
        (['-tr', str(mixed), '-f', str(tmp_path / 'm.pkl'), '--export', str(tmp_path / 'm.onnx')],
         'the training images differ in size: give the size of the images to score (--export_size W H)'),
        (['-tr', small_train, '-f', str(tmp_path / 'm.pkl'), '--export_size', '256', '256'],
         '--export_size needs --export PATH'),
    ]:
        assert mahalanobisad.run(argv + common) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f'mahalanobisad.py: error: {message}'
    assert not os.path.exists(tmp_path / 'm.onnx')


def small_backbone(path):
    """A user's ONNX backbone at opset 11 whose outputs are pooled: a stride-8 map, a GlobalAveragePool
    of a stride-16 map (rewritten to the map when opened) and a GlobalMaxPool (kept as (N, C))."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    weights = {'w1': rng.standard_normal((8, 3, 8, 8)) * 0.05, 'w2': rng.standard_normal((12, 8, 2, 2)) * 0.2}
    nodes = [helper.make_node('Conv', ['input', 'w1'], ['c1'], strides=[8, 8]),
             helper.make_node('Relu', ['c1'], ['stride8']),
             helper.make_node('Conv', ['stride8', 'w2'], ['c2'], strides=[2, 2]),
             helper.make_node('Relu', ['c2'], ['stride16']),
             helper.make_node('GlobalAveragePool', ['stride16'], ['gap']),
             helper.make_node('Flatten', ['gap'], ['pooled']),
             helper.make_node('GlobalMaxPool', ['stride16'], ['gmp']),
             helper.make_node('Flatten', ['gmp'], ['max_pooled'])]
    graph = helper.make_graph(
        nodes, 'small', [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['N', 3, 224, 224])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ('stride8', 'pooled', 'max_pooled')],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 11)])
    model.ir_version = 6
    onnx.save(model, path)
    return path


def test_a_users_pooled_opset11_backbone_exports(tmp_path, small_train):
    backbone = small_backbone(str(tmp_path / 'small.onnx'))
    detector = Detector(model=backbone, method='mahalanobis').fit(image_utils.list_images(small_train))
    assert detector.localizes  # the rewritten pooled output gives the stride-16 map
    paths = SAMPLE[::4]
    tool = list(detector.inspect(paths))
    detector.export(str(tmp_path / 'm.onnx'))
    out = run_model(str(tmp_path / 'm.onnx'), paths)
    np.testing.assert_allclose(out['score'], [t.score for t in tool], rtol=1e-4)
    maps = np.stack([t.anomaly_map for t in tool])
    np.testing.assert_allclose(out['anomaly_map'], maps, atol=1e-3 * np.abs(maps).max())
