"""The int8 backbone (--int8, quantize.py): quantized once at fit time, stored in the feature file and
used as it is by later runs, refused in one line when tampered with, exported as int8, close to
float32."""
import glob
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime import quantization
from sklearn.metrics import roc_auc_score

import image_utils
import mahalanobisad
import quantize
from detector import Detector
from errors import FeatureFileError
from tests import hostile
from tests.conftest import REPO

SAMPLE = sorted(glob.glob(os.path.join(REPO, 'images', '*.png')))
LABELS = np.array([not os.path.basename(p).startswith('good') for p in SAMPLE])
OPTIONS = {'method': 'padim', 'padim_dims': 60}
# int8 against float32 on the sample data, PaDiM fitted on 12 images: relative score change per image
# (measured: at most 1.8%, 0.8% on average; docs/speed.md "int8 backbone").
MAX_SCORE_CHANGE = 0.04
MAX_MEAN_SCORE_CHANGE = 0.015


@pytest.fixture(scope='module')
def fitted(tmp_path_factory, small_train, model_dir):
    """PaDiM fitted on 12 sample images with an int8 backbone (saved) and with the float32 one."""
    folder = tmp_path_factory.mktemp('int8')
    paths = image_utils.list_images(small_train)
    int8 = Detector(model_dir=model_dir, int8=True, **OPTIONS).fit(paths).save(str(folder / 'int8.pkl'))
    float32 = Detector(model_dir=model_dir, **OPTIONS).fit(paths).save(str(folder / 'float32.pkl'))
    return {'int8': int8, 'float32': float32, 'folder': folder}


def test_int8_scores_stay_close_to_float32(fitted):
    int8, float32 = (fitted[k].decision_function(SAMPLE) for k in ('int8', 'float32'))
    change = np.abs(int8 / float32 - 1)
    assert change.max() < MAX_SCORE_CHANGE and change.mean() < MAX_MEAN_SCORE_CHANGE, change
    assert roc_auc_score(LABELS, int8) == roc_auc_score(LABELS, float32) == 1.0
    assert not np.array_equal(int8, float32)  # the backbone is another one indeed
    meta = fitted['int8'].meta_
    assert meta['int8'] is True and meta['int8_backbone']['calibration_images'] == 12  # all of the 12 images
    assert fitted['float32'].meta_['int8'] is False and fitted['float32'].meta_['int8_backbone'] is None


def test_quantized_graph_is_reused_not_rebuilt(fitted, model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the backbone was quantized again')
    monkeypatch.setattr(quantize, 'quantize_backbone', refuse)
    monkeypatch.setattr(quantization, 'quantize_static', refuse)
    loaded = Detector.load(str(fitted['folder'] / 'int8.pkl'), model_dir=model_dir)
    assert loaded.int8 and loaded.int8_backbone_ == fitted['int8'].int8_backbone_
    np.testing.assert_array_equal(loaded.decision_function(SAMPLE[:4]), fitted['int8'].decision_function(SAMPLE[:4]))


def rewritten(fitted, change, name='tampered.pkl'):
    """The int8 feature file with change(members) applied -> its path."""
    path = fitted['folder'] / name
    path.write_bytes(hostile.archive_bytes(change(hostile.members((fitted['folder'] / 'int8.pkl').read_bytes()))))
    return str(path)


def flipped_byte(arrays):
    model = arrays['int8_backbone'].copy()
    model[len(model) // 2] ^= 1
    return dict(arrays, int8_backbone=model)


def garbage_with_its_sha256(arrays):
    garbage = np.frombuffer(b'not an onnx model' * 100, np.uint8)
    recorded = dict(json.loads(str(arrays['meta']))['int8_backbone'], bytes=len(garbage),
                    sha256=quantize.sha256(garbage.tobytes()))
    return hostile.with_meta(dict(arrays, int8_backbone=garbage), int8_backbone=recorded)


TAMPERINGS = {
    'a byte changed': (flipped_byte, r"the int8 backbone's sha256 \w+\.\.\. differs from the recorded"),
    'cut short': (lambda a: dict(a, int8_backbone=a['int8_backbone'][:-100]),
                  r'array int8_backbone has shape \(\d+,\), the method needs \(\d+,\)'),
    'not a model, sha256 recorded': (garbage_with_its_sha256, 'cannot open the int8 backbone'),
    'int8 without its backbone': (lambda a: {k: v for k, v in a.items() if k != 'int8_backbone'},
                                  'missing arrays int8_backbone'),
    'a float file with a backbone': (lambda a: hostile.with_meta(a, int8=False),
                                     'unexpected members int8_backbone.npy'),
    'int8 not a flag': (lambda a: hostile.with_meta(a, int8='yes'), 'int8 yes with int8_backbone'),
}


@pytest.mark.parametrize('case', list(TAMPERINGS))
def test_tampered_int8_backbone_is_refused_in_one_line(fitted, model_dir, case):
    change, message = TAMPERINGS[case]
    with pytest.raises(FeatureFileError, match='tampered.pkl: damaged feature file: ' + message) as error:
        Detector.load(rewritten(fitted, change), model_dir=model_dir)
    assert '\n' not in str(error.value)


def test_int8_export_scores_like_the_tool(fitted, tmp_path):
    detector = fitted['int8']
    scores = detector.decision_function(SAMPLE)
    detector.set_threshold(float(np.median(scores)), 'test')
    path = str(tmp_path / 'int8.onnx')
    detector.export(path)
    model = onnx.load(path)
    assert {p.key: p.value for p in model.metadata_props}['int8'] == 'true'
    assert sum(n.op_type == 'QuantizeLinear' for n in model.graph.node) > 40  # the int8 backbone, inlined
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = dict(zip(['score', 'anomaly_map', 'anomaly'],
                   session.run(None, {'image': np.stack([image_utils.load_image(p) for p in SAMPLE])})))
    np.testing.assert_allclose(out['score'], scores, rtol=1e-4)
    near = np.abs(scores - detector.threshold_) <= 1e-4 * abs(detector.threshold_)
    np.testing.assert_array_equal(out['anomaly'][~near], (scores >= detector.threshold_)[~near])


def test_cli_int8_flag(fitted, small_train, model_dir, tmp_path, monkeypatch, capsys):
    """--int8 fits <train>_<method>_int8.pkl; a later run with -f uses that file as it was fitted
    (int8, no flag needed); --int8 with a float32 file is one line."""
    monkeypatch.chdir(tmp_path)
    common = ['-i', os.path.join(REPO, 'images', 'good_000.png'), '--no_figures', '--model_dir', model_dir]
    assert mahalanobisad.run(['-tr', small_train, '--method', 'padim', '--padim_dims', '60', '--int8'] + common) == 0
    feat = f'{os.path.basename(small_train)}_padim_int8.pkl'
    assert Detector.load(feat, model_dir=model_dir).int8_backbone_ == fitted['int8'].int8_backbone_  # seeded: same
    assert mahalanobisad.run(['-f', feat, '--method', 'padim', '--export', 'm.onnx'] + common) == 0
    assert {p.key: p.value for p in onnx.load('m.onnx').metadata_props}['int8'] == 'true'
    capsys.readouterr()
    assert mahalanobisad.run(['-f', str(fitted['folder'] / 'float32.pkl'), '--method', 'padim', '--int8'] + common) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'int8 False here True' in err
