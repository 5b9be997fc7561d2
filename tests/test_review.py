"""Review and relearn (issue 26): partial_fit equals a fit on all the images, the history, undo, the lock."""
import json
import os
import shutil
import threading

import numpy as np
import pytest

import anomaly_model
import history
import holdout
import mahalanobisad
import review
from detector import Detector
from errors import FeatureFileError, UsageError
import leave_out
from nearest_neighbours import nearest_distances
from tests import hostile
from tests.conftest import REPO


# ----------------------------------------------------------------------------------------------
# the methods, on random feature maps (milliseconds)
# ----------------------------------------------------------------------------------------------

def test_kept_basis_and_woodbury_equal_the_eigenbasis_of_all_rows():
    """Rows added after a kept basis enter by Woodbury's identity: the precision equals the inverted
    covariance and the leave-one-image-out distances equal those from a basis of all the rows, whether
    there are fewer rows than channels or more."""
    rng = np.random.default_rng(0)
    for positions, n, dims in ((3, 40, 10), (2, 16, 30)):
        rows = rng.normal(size=(positions, n, dims)) * rng.uniform(0.1, 5, dims) + 3
        groups = np.repeat(np.arange(n // 2), 2)
        centred = rows - rows.mean(axis=1, keepdims=True)
        covariance = np.swapaxes(centred, 1, 2) @ centred / (n - 1) + 0.01 * np.eye(dims)
        whole = leave_out.regularized_distances(rows, groups, 0.01)
        for kept in (n // 2, n - 2, n):
            basis = leave_out.spectral_basis(rows[:, :kept])
            np.testing.assert_allclose(leave_out.regularized_precision(rows, 0.01, basis), np.linalg.inv(covariance),
                                       rtol=1e-9, atol=1e-9 * np.abs(np.linalg.inv(covariance)).max())
            np.testing.assert_allclose(leave_out.regularized_distances(rows, groups, 0.01, basis), whole, rtol=1e-7)


def _random_method(name, images, seed=3):
    method = anomaly_model.make_method(name, padim_dims=12, spade_k=3, coreset_ratio=0.25)
    method.configure(hostile.SHAPES, hostile.INPUT_SIZE)
    rng = np.random.default_rng(seed)
    maps = [rng.standard_normal((images,) + shape).astype(np.float32) + 1 for shape in hostile.SHAPES]
    return method, method.features(maps)


@pytest.mark.parametrize('name, added, rebase_share', [
    ('mahalanobis', 10, 0.25), ('padim', 10, 0.25), ('padim', 1, 10.0), ('padim', 1, 0.0), ('mahalanobis', 3, 10.0)])
def test_partial_fit_equals_a_fit_on_all_images(name, added, rebase_share, monkeypatch):
    """Fitted on 20 images (each with an augmented copy) and taught more: scores equal the fit on all of
    them (1e-6 relative), and every image's held-out score and map maximum, computed again, equals that
    fit's leave-one-out ones; with the pixel Gaussians' kept basis (rebase_share 10: never made again)
    or a new one (0: always)."""
    monkeypatch.setattr(anomaly_model.PixelGaussian, 'REBASE_SHARE', rebase_share)
    method, features = _random_method(name, 2 * (20 + added))
    groups = np.repeat(np.arange(20 + added), 2)
    old, new = groups < 20, groups >= 20
    full = type(method)(**method.params).fit(features)
    updated = type(method)(**method.params).fit(anomaly_model.select_features(features, old))
    holdout.holdout_scores(updated, anomaly_model.select_features(features, old), groups[old], hostile.INPUT_SIZE)
    updated.keep_training(anomaly_model.select_features(features, old), groups[old])
    updated.partial_fit(anomaly_model.select_features(features, new), groups[new])
    assert np.array_equal(updated.training_groups_, groups)
    queries = _random_method(name, 5, seed=9)[1]
    np.testing.assert_allclose(updated.score(queries, hostile.INPUT_SIZE)[0], full.score(queries, hostile.INPUT_SIZE)[0],
                               rtol=1e-6)
    scores, maxima = holdout.holdout_scores(updated, updated.training_, updated.training_groups_, hostile.INPUT_SIZE)
    expected_scores, expected_maxima = holdout.holdout_scores(full, features, groups, hostile.INPUT_SIZE)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
    np.testing.assert_allclose(maxima, expected_maxima, rtol=1e-5)


def test_spade_partial_fit_equals_a_fit_on_all_images():
    """SPADE appends: scores equal the fit on all 30 images, and the 10 new images' held-out scores that
    fit's leave-one-out ones."""
    method, features = _random_method('spade', 60)
    groups = np.repeat(np.arange(30), 2)
    old, new = groups < 20, groups >= 20
    full = type(method)(**method.params).fit(features)
    updated = type(method)(**method.params).fit(anomaly_model.select_features(features, old))
    updated.partial_fit(anomaly_model.select_features(features, new), groups[new])
    queries = _random_method('spade', 5, seed=9)[1]
    np.testing.assert_allclose(updated.score(queries, hostile.INPUT_SIZE)[0], full.score(queries, hostile.INPUT_SIZE)[0],
                               rtol=1e-6)
    scores, maxima = updated.added_holdout_scores(anomaly_model.select_features(features, new), groups[new],
                                                  hostile.INPUT_SIZE)
    expected_scores, expected_maxima = full.holdout_scores(features, groups, hostile.INPUT_SIZE)
    np.testing.assert_allclose(scores, expected_scores[20:], rtol=1e-5)
    np.testing.assert_allclose(maxima, expected_maxima[20:], rtol=1e-5)


def test_patchcore_partial_fit_extends_the_bank_and_covers_the_new_patches():
    """The bank keeps its rows and gains the coreset ratio's share of the new patches, and covers the union
    as well as a full fit's bank does (covering radius within 10%)."""
    method, features = _random_method('patchcore', 40)
    full = type(method)(**method.params).fit(features)
    updated = type(method)(**method.params).fit(anomaly_model.select_features(features, slice(0, 20)))
    before = updated.bank_.copy()
    updated.partial_fit(anomaly_model.select_features(features, slice(20, 40)), np.arange(20, 40))
    patches = features['patches'].reshape(-1, features['patches'].shape[-1])
    assert np.array_equal(updated.bank_[:len(before)], before)
    assert len(updated.bank_) == pytest.approx(len(full.bank_), abs=2)
    radius = lambda bank: nearest_distances(patches, bank)[0].max()  # noqa: E731
    assert radius(updated.bank_) <= 1.1 * radius(full.bank_)
    groups = np.arange(20, 40)
    scores, maxima = updated.added_holdout_scores(anomaly_model.select_features(features, slice(20, 40)), groups,
                                                  hostile.INPUT_SIZE)
    in_sample = updated.score(anomaly_model.select_features(features, slice(20, 40)), hostile.INPUT_SIZE)[0]
    assert scores.shape == (20,) and np.all(scores >= in_sample - 1e-6)


# ----------------------------------------------------------------------------------------------
# the Detector and its feature file, on the sample images
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def taught(small_train, model_dir, tmp_path_factory):
    """A feature file fitted on 8 sample images, and 4 more to teach: one already taught, one broken."""
    folder = tmp_path_factory.mktemp('review')
    paths = sorted(os.path.join(small_train, name) for name in os.listdir(small_train))
    extra = folder / 'extra'
    extra.mkdir()
    for path in paths[8:11] + paths[:1]:
        shutil.copy(path, extra)
    (extra / 'broken.png').write_bytes(b'not an image')
    feat = str(folder / 'base.pkl')
    Detector(model_dir=model_dir).fit(paths[:8], by='tester').save(feat)
    return feat, paths, sorted(str(p) for p in extra.iterdir()), model_dir


def test_partial_fit_of_images_equals_the_fit_on_all_and_records_it(taught, caplog):
    feat, paths, extra, model_dir = taught
    caplog.set_level('INFO')
    detector = Detector.load(feat, model_dir=model_dir).partial_fit(extra, by='alice')
    full = Detector(model_dir=model_dir).fit(paths[:11])
    probe = [os.path.join(REPO, 'images', 'good_000.png'), os.path.join(REPO, 'images', 'broken_large_000.png')]
    np.testing.assert_allclose(detector.decision_function(probe), full.decision_function(probe), rtol=1e-6)
    # every image's held-out score, computed again, is the full fit's leave-one-out score: so are the thresholds
    np.testing.assert_allclose(detector.holdout_.image, full.holdout_.image, rtol=1e-6)
    # (the pixel Gaussians: 11 images in 256 channels, Woodbury's and the eigenbasis' rounding differ by ~1e-6)
    np.testing.assert_allclose(detector.holdout_.pixel_maxima, full.holdout_.pixel_maxima, rtol=2e-5)
    assert detector.threshold_ == pytest.approx(full.threshold_, rel=1e-6)
    entry = detector.meta_['history'][-1]
    assert [e['kind'] for e in detector.meta_['history']] == ['fit', 'add_good']
    assert entry['by'] == 'alice' and entry['n_images'] == 3 and detector.meta_['n_train_images'] == 11
    assert [image['sha256'] for image in entry['images']] == [history.image_sha256(p) for p in paths[8:11]]
    assert entry['skipped'] == [{'name': extra[0], 'why': 'already taught'}]  # 000.png, fitted on
    assert 'broken.png' not in json.dumps(entry)
    assert 'skipped (already taught)' in caplog.text and 'broken.png' in caplog.text
    assert entry['thresholds_before']['image'] is not None and entry['thresholds_after']['rule'] == 'holdout'
    # nothing new: nothing changes, no entry
    assert len(detector.partial_fit(extra).meta_['history']) == 2


def test_history_round_trip_undo_and_cli(taught, tmp_path, capsys):
    feat, paths, extra, model_dir = taught
    copy = str(tmp_path / 'line.pkl')
    shutil.copy(feat, copy)
    original = Detector.load(copy, model_dir=model_dir)
    probe = [os.path.join(REPO, 'images', 'good_000.png')]
    assert mahalanobisad.run(['-f', copy, '--add_good', os.path.dirname(extra[0]), '--by', 'bob',
                              '--model_dir', model_dir]) == 0
    updated = Detector.load(copy, model_dir=model_dir)
    assert updated.meta_['n_train_images'] == 11 and updated.meta_['history'][-1]['by'] == 'bob'
    report = tmp_path / 'history.json'
    assert mahalanobisad.run(['-f', copy, '--history', '--json', str(report), '--model_dir', model_dir]) == 0
    out = capsys.readouterr().out
    assert '#1' in out and 'by bob: add_good 3 images' in out and paths[8] not in out  # names as listed from --add_good
    assert json.loads(report.read_text())['history'] == updated.meta_['history']
    assert mahalanobisad.run(['-f', copy, '--undo', '--by', 'carol', '--model_dir', model_dir]) == 0
    restored = Detector.load(copy, model_dir=model_dir)
    assert restored.meta_['n_train_images'] == 8
    assert restored.decision_function(probe) == pytest.approx(original.decision_function(probe), rel=1e-9)
    kinds = [(e['kind'], e['by']) for e in restored.meta_['history']]
    assert kinds == [('fit', 'tester'), ('add_good', 'bob'), ('undo', 'carol')]
    assert history.taught_digests(restored.meta_['history']) == history.taught_digests(original.meta_['history'])
    assert mahalanobisad.run(['-f', copy, '--undo', '--model_dir', model_dir]) == 1
    assert 'no change to undo' in capsys.readouterr().err


def test_two_writers_at_once_lose_no_update(taught, tmp_path):
    feat, paths, extra, model_dir = taught
    copy = str(tmp_path / 'shared.pkl')
    shutil.copy(feat, copy)
    errors = []

    def teach(images, by):
        try:
            review.add_good(copy, images, by, model_dir=model_dir)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    writers = [threading.Thread(target=teach, args=(paths[8:10], 'one')),
               threading.Thread(target=teach, args=(paths[10:12], 'two'))]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not errors
    result = Detector.load(copy, model_dir=model_dir)
    assert result.meta_['n_train_images'] == 12 and len(result.holdout_.image) == 12
    assert sorted(e['by'] for e in result.meta_['history'][1:]) == ['one', 'two']
    with review.locked(copy), pytest.raises(FeatureFileError, match='being updated by another process'):
        review.add_good(copy, paths[:1], timeout=0.2, model_dir=model_dir)


def test_a_feature_file_of_another_method_or_backbone_is_refused(taught, capsys):
    feat, _, extra, model_dir = taught
    for flags, message in ((['--method', 'padim'], 'cannot be used with this backbone and method'),
                           (['-m', 'lite1'], "backbone 'efficientnet-lite0' here 'efficientnet-lite1'")):
        assert mahalanobisad.run(['-f', feat, '--add_good', os.path.dirname(extra[0]), '--model_dir', model_dir]
                                 + flags) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UsageError):
        Detector(model_dir=model_dir).partial_fit(extra)


def test_labelled_defects_are_kept_and_the_threshold_follows_them(taught, tmp_path):
    """Defects taught: their features are stored, the threshold becomes F1-optimal between the held-out good
    images and them (recall and hold-out FPR recorded); teaching good images later re-derives it from the
    stored features (no images needed); a defect already taught is skipped."""
    feat, paths, extra, model_dir = taught
    copy = str(tmp_path / 'defects.pkl')
    shutil.copy(feat, copy)
    defects = [os.path.join(REPO, 'images', name) for name in ('broken_large_000.png', 'contamination_000.png')]
    detector = review.add_defects(copy, defects + defects[:1], by='dora', model_dir=model_dir)
    thresholds = detector.thresholds_
    assert thresholds.rule == 'F1-optimal' and thresholds.calibration['n_defects'] == 2
    assert thresholds.calibration['n_good'] == 8 and 0 <= thresholds.calibration['recall'] <= 1
    stored = Detector.load(copy, model_dir=model_dir)
    assert len(stored.method_.labelled_['pooled8']) == 2 and stored.thresholds_.calibration == thresholds.calibration
    scores = stored.decision_function(defects)
    assert np.mean(scores >= stored.threshold_) == thresholds.calibration['recall']
    after = review.add_good(copy, paths[8:10], model_dir=model_dir, by='dora')
    assert after.thresholds_.calibration['n_good'] == 10 and after.thresholds_.rule == 'F1-optimal'
    assert len(review.add_defects(copy, defects[:1], model_dir=model_dir).meta_['history']) == 3  # nothing new
