import os
import pickle

import cv2
import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

import anomaly_model
import feature_file
import feature_maps
import holdout
import nearest_neighbours
import thresholds
from anomaly_model import MahalanobisAD, PixelGaussian
from errors import FeatureFileError
from tests.conftest import Payload


def random_levels(rng, n, dims=(3, 7, 20)):
    return [rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) for d in dims]


def test_mahalanobis_matches_scipy_and_sklearn():
    rng = np.random.default_rng(0)
    train, test = random_levels(rng, 50), random_levels(rng, 9)
    model = MahalanobisAD().fit(train)
    expected = np.zeros(9)
    for level_train, level_test in zip(train, test):
        lw = LedoitWolf().fit(level_train)
        inverse = np.linalg.inv(lw.covariance_)
        expected += [mahalanobis(x, lw.location_, inverse) for x in level_test]
    np.testing.assert_allclose(model.score(test), expected, rtol=1e-5)  # float32 scoring: within 1e-5
    assert model.level_distances(test).shape == (9, 3)


def test_pixel_gaussian_matches_scipy_per_position():
    rng = np.random.default_rng(1)
    # two levels: 8x8 (pooled onto the 4x4 grid) and 4x4
    train_maps = [None, rng.standard_normal((30, 3, 8, 8)), rng.standard_normal((30, 2, 4, 4))]
    test_maps = [None, rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 2, 4, 4))]
    train_patches = feature_maps.embed_patches(train_maps, [1, 2], 4)
    assert train_patches.shape == (30, 16, 5) and train_patches.dtype == np.float32
    model = PixelGaussian(regularization=0.01).fit(train_patches)
    test_patches = feature_maps.embed_patches(test_maps, [1, 2], 4)
    position, image = 5, 1  # row 1, column 1 of the grid
    pooled = test_maps[1][image, :, 2:4, 2:4].mean(axis=(1, 2))
    np.testing.assert_allclose(test_patches[image, position, :3], pooled, rtol=1e-5)
    column = train_patches[:, position].astype(np.float64)
    covariance = np.cov(column, rowvar=False) + 0.01 * np.eye(5)
    expected = mahalanobis(test_patches[image, position], column.mean(0), np.linalg.inv(covariance))
    assert model.distances(test_patches)[image, position] == pytest.approx(expected, rel=1e-4)


def test_resample_bilinear_matches_opencv():
    maps = np.random.default_rng(8).standard_normal((2, 3, 7, 7)).astype(np.float32)
    ours = feature_maps.resample(maps, 14)
    expected = np.stack([cv2.resize(m.transpose(1, 2, 0), (14, 14), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
                         for m in maps])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_choose_pixel_levels_by_stride():
    assert feature_maps.choose_pixel_levels([112, 112, 56, 28, 14, 14, 7, 7, 7], 224) == [2, 3, 4, 5]
    assert feature_maps.choose_pixel_levels([1, 1, 1], 224) == []


@pytest.mark.parametrize('labels, scores, expected_f1, low, high', [
    ([0, 0, 0, 1, 1], [1, 2, 3, 5, 9], 1.0, 3, 5),          # separable: threshold inside the gap
    ([0, 0, 1, 0, 1, 1], [1, 2, 3, 4, 5, 6], 6 / 7, 2, 3),   # one normal above an anomaly
    ([0, 1, 1, 1], [5, 1, 2, 3], 6 / 7, 0, 1),               # the normal scores highest
])
def test_f1_optimal_threshold_constructed_cases(labels, scores, expected_f1, low, high):
    threshold, f1 = thresholds.f1_optimal_threshold(np.array(labels, bool), np.array(scores, float))
    assert f1 == pytest.approx(expected_f1)
    assert low <= threshold <= high
    predicted = np.array(scores) >= threshold
    tp = (predicted & np.array(labels, bool)).sum()
    assert 2 * tp / (predicted.sum() + sum(labels)) == pytest.approx(f1)


def test_f1_optimal_threshold_needs_both_classes():
    with pytest.raises(ValueError, match='both normal and anomalous'):
        thresholds.f1_optimal_threshold(np.zeros(4, bool), np.arange(4.0))


def pooled_only_method():
    method = anomaly_model.MahalanobisMethod()
    method.configure([(4, 1, 1)], 224)  # one pooled output: image-level only
    return method


def test_holdout_scores_exclude_each_source_image_and_its_copies():
    rng = np.random.default_rng(3)
    features = {'pooled0': random_levels(rng, 40, dims=(4,))[0].astype(np.float32)}
    groups = np.repeat(np.arange(20), 2)
    features['pooled0'][groups == 7] += 50  # an outlier source image, in two copies
    method = pooled_only_method().fit(features)
    scores, pixel_max = holdout.holdout_scores(method, features, groups, 16)
    assert pixel_max is None and scores.shape == (20,)  # one per source image: its first (plain) row
    in_sample = MahalanobisAD().fit([features['pooled0']]).score([features['pooled0']])
    assert scores[7] > in_sample[groups == 7].max()  # not fitted on itself
    assert scores[7] > 3 * np.delete(scores, 7).max()
    np.testing.assert_array_equal(scores, holdout.holdout_scores(method, features, groups, 16)[0])


def fitted_method():
    rng = np.random.default_rng(4)
    method = anomaly_model.make_method('mahalanobis')
    shapes = [(3, 8, 8), (5, 4, 4), (6, 2, 2)]  # input 32: strides 4, 8, 16
    method.configure(shapes, 32)
    maps = [rng.standard_normal((30,) + shape).astype(np.float32) for shape in shapes]
    return {'backbone': 'x'}, method.fit(method.features(maps)), maps


def test_feature_file_round_trip(tmp_path):
    meta, method, maps = fitted_method()
    path = str(tmp_path / 'train.pkl')
    feature_file.save(path, meta, [method])
    assert os.listdir(tmp_path) == ['train.pkl']  # no temporary file left behind
    loaded_meta, (loaded,), int8_backbone = feature_file.load(path)
    assert loaded_meta['backbone'] == 'x' and loaded_meta['version'] == feature_file.FEATURE_FILE_VERSION
    assert loaded.name == 'mahalanobis' and loaded.params == method.params and int8_backbone is None
    features = method.features([m[:3] for m in maps])
    for a, b in zip(method.score(features, 32), loaded.score(features, 32)):
        np.testing.assert_array_equal(a, b)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'train.pkl'
    path.write_bytes(pickle.dumps({'features': Payload(marker)}))
    with pytest.raises(FeatureFileError, match='pickles are never loaded'):
        feature_file.load(str(path))
    assert not marker.exists()


def test_pickle_inside_an_npz_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = str(tmp_path / 'train.pkl')
    with open(path, 'wb') as f:
        np.savez(f, meta=np.array([Payload(marker)], dtype=object))
    with pytest.raises(FeatureFileError, match='damaged feature file: member meta holds Python objects'):
        feature_file.load(path)
    assert not marker.exists()


def test_feature_file_version_and_format_checked(tmp_path):
    meta, method, _ = fitted_method()
    path = str(tmp_path / 'f.pkl')
    feature_file.save(path, meta, [method])
    content = dict(np.load(path))
    version = f'"version": {feature_file.FEATURE_FILE_VERSION}'
    content['meta'] = np.array(str(content['meta']).replace(version, '"version": 99'))
    with open(path, 'wb') as f:
        np.savez(f, **content)
    with pytest.raises(FeatureFileError, match='version 99'):
        feature_file.load(path)
    with pytest.raises(FeatureFileError, match='not found'):
        feature_file.load(str(tmp_path / 'none.pkl'))


def test_pooling_matrix_integer_and_fractional_factors():
    rng = np.random.default_rng(6)
    maps = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    pool = feature_maps._pooling_matrix(56, 14)
    np.testing.assert_allclose(pool.T @ maps @ pool, maps.reshape(2, 3, 14, 4, 14, 4).mean(axis=(3, 5)), atol=1e-6)
    fractional = feature_maps._pooling_matrix(65, 17)
    np.testing.assert_allclose(fractional.sum(axis=0), 1, rtol=1e-6)  # each cell is an average
    np.testing.assert_allclose(np.ones(65, np.float32) @ fractional, 1, rtol=1e-6)
    assert (fractional > 0).sum(axis=0).max() <= 5  # each cell covers about 65 / 17 pixels


# ----------------------------------------------------------------------------------------------
# Every method on synthetic feature maps: a backbone with input 128 and outputs of stride 4..32
# ----------------------------------------------------------------------------------------------

SHAPES = [(4, 32, 32), (6, 16, 16), (8, 8, 8), (10, 4, 4)]


def synthetic_maps(rng, n, defect=False):
    """Random maps; a defect adds a bump to every level in rows 32-64, columns 64-96 of the
    128 px input (the same place at every stride)."""
    maps = []
    for c, h, w in SHAPES:
        m = rng.standard_normal((n, c, h, w)).astype(np.float32)
        if defect:
            m[:, :, h // 4:h // 2, w // 2:3 * w // 4] += 5
        maps.append(m)
    return maps


@pytest.mark.parametrize('name', list(anomaly_model.METHODS))
def test_method_scores_and_locates_a_planted_defect(name):
    rng = np.random.default_rng(10)
    method = anomaly_model.make_method(name, padim_dims=12, spade_k=5, coreset_ratio=0.25)
    method.configure(SHAPES, 128)
    method.fit(method.features(synthetic_maps(rng, 40)))
    clean_scores, clean_maps = method.score(method.features(synthetic_maps(rng, 6)), 128)
    defect_scores, defect_maps = method.score(method.features(synthetic_maps(rng, 1, defect=True)), 128)
    assert defect_scores[0] > clean_scores.max()
    assert clean_maps.shape == (6, 128, 128) and defect_maps.dtype == np.float32
    row, column = np.unravel_index(defect_maps[0].argmax(), (128, 128))
    assert 24 <= row <= 72 and 56 <= column <= 104, (row, column)
    assert defect_maps[0, 36:60, 68:92].mean() > clean_maps.max()


@pytest.mark.parametrize('name', ['padim', 'patchcore'])
def test_seeded_methods_are_deterministic(name):
    states = []
    for _ in range(2):
        method = anomaly_model.make_method(name, padim_dims=12, coreset_ratio=0.25, seed=3)
        method.configure(SHAPES, 128)
        states.append(method.fit(method.features(synthetic_maps(np.random.default_rng(11), 20))).state())
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])
    other = anomaly_model.make_method(name, padim_dims=12, coreset_ratio=0.25, seed=4)
    other.configure(SHAPES, 128)
    other_state = other.fit(other.features(synthetic_maps(np.random.default_rng(11), 20))).state()
    assert any(not np.array_equal(states[0][k], other_state[k]) for k in states[0])


def test_greedy_coreset_covers_every_cluster():
    rng = np.random.default_rng(12)
    centres = rng.uniform(-100, 100, (8, 5)).astype(np.float32)
    points = (centres.repeat(50, axis=0) + rng.standard_normal((400, 5))).astype(np.float32)
    chosen = nearest_neighbours.greedy_coreset(points, 8, seed=0)
    assert len(set(chosen.tolist())) == 8
    assert sorted(np.unique(chosen // 50).tolist()) == list(range(8))  # one point from every cluster
    covering = nearest_neighbours.nearest_distances(points, points[chosen])[0].max()
    random_covering = nearest_neighbours.nearest_distances(points, points[rng.choice(400, 8, replace=False)])[0].max()
    assert covering < 10 and covering <= random_covering  # within a cluster's radius


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(13)
    queries, bank = rng.standard_normal((50, 6)).astype(np.float32), rng.standard_normal((70, 6)).astype(np.float32)
    distances, indices = nearest_neighbours.nearest_distances(queries, bank, chunk=16)
    full = np.linalg.norm(queries[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(indices, full.argmin(axis=1))
    np.testing.assert_allclose(distances, full.min(axis=1), rtol=1e-4, atol=1e-4)


def test_upsample_and_smooth_takes_more_maps_than_opencv_takes_channels():
    """A hold-out fold of hundreds of images (augmented fits) is smoothed in chunks OpenCV accepts."""
    grids = np.random.default_rng(0).random((300, 7, 7)).astype(np.float32)
    smoothed = feature_maps.upsample_and_smooth(grids, 32)
    assert smoothed.shape == (300, 32, 32)
    np.testing.assert_allclose(smoothed[299], feature_maps.upsample_and_smooth(grids[299:], 32)[0], rtol=1e-5)
