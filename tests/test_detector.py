"""The Python API: the Detector behind every front end gives exactly the CLI's scores and thresholds."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

import image_utils
import mahalanobisad
from detector import Detector, UsageError
from image_utils import ImageError
from tests.conftest import REPO

SAMPLE = sorted(os.path.join('images', f) for f in os.listdir(os.path.join(REPO, 'images')) if f.endswith('.png'))
OPTIONS = {'padim_dims': 50, 'spade_k': 5, 'coreset_ratio': 0.2}


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope='module')
def train_paths(small_train):
    return image_utils.list_images(small_train)


@pytest.fixture(scope='module')
def fitted(train_paths, model_dir):
    """One fitted detector per method, shared by the tests below."""
    return {method: Detector(method=method, model_dir=model_dir, **OPTIONS).fit(train_paths)
            for method in ('mahalanobis', 'padim', 'spade', 'patchcore')}


def masks_of(paths):
    return [image_utils.find_mask(p, 'images', 'gt_masks') for p in paths]


def test_import_has_no_side_effects():
    """Importing parses no arguments, starts no threads and opens no backbone."""
    code = ('import sys, threading; sys.argv = ["x", "--bogus"]; import mahalanobisad, model_utils; '
            'assert threading.active_count() == 1, threading.enumerate(); '
            'assert model_utils.open_backbone.cache_info().currsize == 0; print("ok")')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr


@pytest.mark.parametrize('method', ['mahalanobis', 'padim', 'spade', 'patchcore'])
def test_api_scores_equal_cli_scores_and_files_are_shared(method, fitted, tmp_path, model_dir, small_train):
    """A file saved by the API is used by the CLI (identical scores) and one saved by the CLI by the API."""
    detector = fitted[method]
    api_file, report = str(tmp_path / 'api.pkl'), str(tmp_path / 'r.json')
    detector.save(api_file)
    assert mahalanobisad.run(['-f', api_file, '-i', 'images', '--no_figures', '--json', report,
                              '--method', method, '--model_dir', model_dir]) == 0
    with open(report) as f:
        cli = json.load(f)
    api_scores = detector.decision_function([r['path'] for r in cli['images']])
    assert np.abs(api_scores - [r['score'] for r in cli['images']]).max() == 0
    # The CLI calibrated on images/ + gt_masks/: the API's calibrate gives the same thresholds.
    detector.calibrate(SAMPLE, masks_of(SAMPLE))
    assert detector.threshold_ == cli['threshold'] and detector.pixel_threshold_ == cli['pixel_threshold']
    assert list(detector.predict([r['path'] for r in cli['images']])) == [int(r['anomaly']) for r in cli['images']]

    cli_file = str(tmp_path / 'cli.pkl')
    assert mahalanobisad.run(['-tr', small_train, '-f', cli_file, '-i', 'images/good_000.png', '--no_figures', '--method', method,
                              '--model_dir', model_dir, '--padim_dims', '50', '--spade_k', '5',
                              '--coreset_ratio', '0.2']) == 0
    from_cli = Detector.load(cli_file, model_dir=model_dir)
    # the CLI stored the thresholds it calibrated on images/ + gt_masks/ in the file (issue 10)
    assert from_cli.method == method and from_cli.threshold_source_ == 'F1-optimal on images + gt_masks'
    np.testing.assert_array_equal(from_cli.decision_function(SAMPLE), detector.decision_function(SAMPLE))


def test_fitting_on_arrays_or_paths_gives_the_same_detector(train_paths, fitted, model_dir):
    arrays = [cv2.imread(p)[..., ::-1].copy() for p in train_paths]
    from_arrays = Detector(method='padim', model_dir=model_dir, **OPTIONS).fit(arrays)
    test_arrays = [cv2.imread(p)[..., ::-1].copy() for p in SAMPLE]
    scores = fitted['padim'].decision_function(SAMPLE)
    np.testing.assert_array_equal(from_arrays.decision_function(SAMPLE), scores)
    np.testing.assert_array_equal(fitted['padim'].decision_function(test_arrays), scores)
    assert from_arrays.meta_['holdout_scores'] == fitted['padim'].meta_['holdout_scores']


@pytest.mark.parametrize('method', ['mahalanobis', 'patchcore'])
def test_save_load_round_trip_keeps_scores_maps_and_thresholds(method, fitted, tmp_path, model_dir):
    detector = fitted[method]
    detector.set_threshold(12.5, 'a test')
    path = str(tmp_path / 'd.pkl')
    detector.save(path)
    loaded = Detector.load(path, model_dir=model_dir)
    assert (loaded.threshold_, loaded.pixel_threshold_, loaded.threshold_source_) == \
        (12.5, detector.pixel_threshold_, 'a test')
    before, after = list(detector.inspect(SAMPLE[:5])), list(loaded.inspect(SAMPLE[:5]))
    for a, b in zip(before, after):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    detector.use_holdout_thresholds()


def test_inspect_reports_unreadable_items_in_place(fitted, tmp_path, caplog):
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not a png')
    items = [SAMPLE[0], str(broken), np.zeros((5, 5), np.float32), cv2.imread(SAMPLE[1])[..., ::-1].copy()]
    results = list(fitted['mahalanobis'].inspect(items))
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.error is None for r in results] == [True, False, False, True]
    assert 'cannot decode' in results[1].error and 'uint8' in results[2].error
    assert results[0].path == SAMPLE[0] and results[3].path is None
    assert results[3].view.shape == (224, 224, 3) and results[3].anomaly_map.shape == (224, 224)
    with pytest.raises(ImageError, match='cannot decode'):
        fitted['mahalanobis'].decision_function(items[:2])


def test_images_of_another_size_are_brought_to_the_training_size_first(train_paths, model_dir, tmp_path, caplog):
    """Fitted on 320 px images, a 900 px image scores as its 320 px copy (INTER_AREA), as a file and as
    an array, which is not how it scores resized straight to the view; another aspect ratio is scored
    as it is, with a warning."""
    folder = tmp_path / 'train320'
    folder.mkdir()
    for path in train_paths[:6]:
        cv2.imwrite(str(folder / os.path.basename(path)), cv2.resize(cv2.imread(path), (320, 320)))
    detector = Detector(method='padim', model_dir=model_dir, **OPTIONS).fit(image_utils.list_images(str(folder)))
    assert detector.meta_['train_image_size'] == [320, 320]
    big = cv2.resize(cv2.imread(SAMPLE[0]), (900, 900), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tmp_path / 'big.png'), big)
    brought = cv2.resize(big, (320, 320), interpolation=cv2.INTER_AREA)
    rgb = [big[..., ::-1].copy(), brought[..., ::-1].copy()]
    with caplog.at_level('INFO', logger='mahalanobisad'):
        scores = detector.decision_function([str(tmp_path / 'big.png')] + rgb)
    assert scores[0] == scores[1] == scores[2]
    assert 'images of 900x900 are brought to the training images\' 320x320' in caplog.text
    detector.meta_['train_image_size'] = None
    assert detector.decision_function(rgb[:1])[0] != scores[0]
    detector.meta_['train_image_size'] = [320, 320]
    caplog.clear()
    detector._size_warned = False  # said once per detector
    detector.decision_function([cv2.resize(brought, (480, 320))])
    assert 'images of 480x320, the training images were 320x320 (another aspect ratio)' in caplog.text


def test_inspect_is_lazy(fitted):
    """A generator of inputs is consumed as results are taken, never all at once."""
    taken = []

    def endless():
        while True:
            taken.append(1)
            yield SAMPLE[len(taken) % len(SAMPLE)]
    results = fitted['mahalanobis'].inspect(endless())
    first = next(results)
    results.close()
    assert first.error is None and len(taken) <= 2 * fitted['mahalanobis'].batch_size + 1


def test_calibrate_without_both_classes_falls_back_to_the_holdout(fitted, caplog):
    detector = fitted['padim']
    goods = [p for p in SAMPLE if 'good' in p]
    detector.calibrate(goods, [None] * len(goods))
    assert detector.threshold_source_ == 'training hold-out' and 'no defect masks' in caplog.text
    assert detector.threshold_ == detector.meta_['holdout_thresholds']['image']


def test_errors_are_the_tools_own(fitted, model_dir, tmp_path):
    with pytest.raises(UsageError, match='not fitted'):
        Detector(model_dir=model_dir).decision_function(SAMPLE)
    with pytest.raises(UsageError, match='unknown method'):
        Detector(method='svm')
    with pytest.raises(UsageError, match='seed must be an integer >= 0'):
        Detector(seed=-1)
    with pytest.raises(UsageError, match='differ in length'):
        list(fitted['mahalanobis'].inspect(SAMPLE[:3], [None]))
    with pytest.raises(UsageError, match='at least 2 readable'):
        Detector(model_dir=model_dir).fit(SAMPLE[:1])
    path = str(tmp_path / 'p.pkl')
    fitted['padim'].save(path)
    with pytest.raises(mahalanobisad.FeatureFileError, match="method 'padim' here 'spade'"):
        Detector.load(path, method='spade', model_dir=model_dir)


def test_readme_python_example_runs(tmp_path, model_dir):
    """The "Python API" example of docs/usage.md, as written, on the sample data."""
    with open(os.path.join(REPO, 'docs', 'usage.md')) as f:
        readme = f.read()
    section = readme.split('## Python API', 1)[1]
    code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
    code = code.replace("model_dir='models'", f'model_dir={model_dir!r}')
    for name in ('bottle_padim.pkl', 'figure.png'):  # outputs go to the test's folder, not the repository
        code = code.replace(repr(name), repr(str(tmp_path / name)))
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'ANOMALY' in result.stdout and os.path.exists(tmp_path / 'bottle_padim.pkl')
    assert os.path.exists(tmp_path / 'figure.png')
