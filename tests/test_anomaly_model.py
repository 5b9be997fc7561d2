import os
import pickle

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

import anomaly_model
from anomaly_model import FeatureFileError, MahalanobisAD, PixelGaussian
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
    model = PixelGaussian([1, 2], grid=4, regularization=0.01)
    train_embeddings = model.embed(train_maps)
    assert train_embeddings.shape == (16, 30, 5)
    model.fit(train_embeddings)
    test_embeddings = model.embed(test_maps)
    position, image = 5, 1  # row 1, column 1 of the grid
    pooled = test_maps[1][image, :, 2:4, 2:4].mean(axis=(1, 2))
    np.testing.assert_allclose(test_embeddings[position, image, :3], pooled, rtol=1e-5)
    column = train_embeddings[position].astype(np.float64)
    covariance = np.cov(column, rowvar=False) + 0.01 * np.eye(5)
    expected = mahalanobis(test_embeddings[position, image], column.mean(0), np.linalg.inv(covariance))
    squared = np.einsum('pnd,pnd->pn', np.matmul(test_embeddings - model.mean_[:, None], model.precision_),
                        test_embeddings - model.mean_[:, None])
    assert np.sqrt(squared[position, image]) == pytest.approx(expected, rel=1e-4)
    maps = model.score_maps(test_embeddings, 32)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32 and (maps > 0).all()


def test_pixel_gaussian_locates_a_planted_defect():
    rng = np.random.default_rng(2)
    train = [rng.standard_normal((40, 4, 8, 8)).astype(np.float32)]
    test = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    test[0, :, 1, 6] += 8
    model = PixelGaussian([0], grid=8)
    model.fit(model.embed(train))
    anomaly_map = model.score_maps(model.embed([test]), 64)[0]
    row, column = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
    assert 8 <= row < 16 and 48 <= column < 56


def test_choose_pixel_levels_by_stride():
    assert anomaly_model.choose_pixel_levels([112, 112, 56, 28, 14, 14, 7, 7, 7], 224) == [2, 3, 4, 5]
    assert anomaly_model.choose_pixel_levels([1, 1, 1], 224) == []


@pytest.mark.parametrize('labels, scores, expected_f1, low, high', [
    ([0, 0, 0, 1, 1], [1, 2, 3, 5, 9], 1.0, 3, 5),          # separable: threshold inside the gap
    ([0, 0, 1, 0, 1, 1], [1, 2, 3, 4, 5, 6], 6 / 7, 2, 3),   # one normal above an anomaly
    ([0, 1, 1, 1], [5, 1, 2, 3], 6 / 7, 0, 1),               # the normal scores highest
])
def test_f1_optimal_threshold_constructed_cases(labels, scores, expected_f1, low, high):
    threshold, f1 = anomaly_model.f1_optimal_threshold(np.array(labels, bool), np.array(scores, float))
    assert f1 == pytest.approx(expected_f1)
    assert low <= threshold <= high
    predicted = np.array(scores) >= threshold
    tp = (predicted & np.array(labels, bool)).sum()
    assert 2 * tp / (predicted.sum() + sum(labels)) == pytest.approx(f1)


def test_f1_optimal_threshold_needs_both_classes():
    with pytest.raises(ValueError, match='both normal and anomalous'):
        anomaly_model.f1_optimal_threshold(np.zeros(4, bool), np.arange(4.0))


def test_holdout_scores_exclude_each_source_image_and_its_copies():
    rng = np.random.default_rng(3)
    features = random_levels(rng, 40, dims=(4,))
    groups = np.repeat(np.arange(20), 2)
    features[0][groups == 7] += 50  # an outlier source image, in two copies
    scores, maps = anomaly_model.holdout_scores(features, None, groups, 0, 16, folds=5)
    assert maps is None and scores.shape == (40,)
    in_sample = MahalanobisAD().fit(features).score(features)
    assert scores[groups == 7].min() > in_sample[groups == 7].max()  # not fitted on itself
    np.testing.assert_array_equal(scores, anomaly_model.holdout_scores(features, None, groups, 0, 16, folds=5)[0])


def fitted_models():
    rng = np.random.default_rng(4)
    image_model = MahalanobisAD().fit(random_levels(rng, 30))
    pixel_model = PixelGaussian([0], grid=2)
    pixel_model.fit(pixel_model.embed([rng.standard_normal((30, 3, 2, 2))]))
    meta = {'backbone': 'x', 'image_levels': [0, 1, 2], 'pixel_levels': [0], 'pixel_grid': 2}
    return meta, image_model, pixel_model


def test_feature_file_round_trip(tmp_path):
    meta, image_model, pixel_model = fitted_models()
    path = str(tmp_path / 'train.pkl')
    anomaly_model.save_feature_file(path, meta, image_model, pixel_model)
    assert os.listdir(tmp_path) == ['train.pkl']  # no temporary file left behind
    loaded_meta, loaded_image, loaded_pixel = anomaly_model.load_feature_file(path)
    assert loaded_meta['backbone'] == 'x' and loaded_meta['version'] == anomaly_model.FEATURE_FILE_VERSION
    for a, b in zip(image_model.precisions_, loaded_image.precisions_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pixel_model.precision_, loaded_pixel.precision_)
    assert loaded_pixel.levels == [0] and loaded_pixel.grid == 2


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'train.pkl'
    path.write_bytes(pickle.dumps({'features': Payload(marker)}))
    with pytest.raises(FeatureFileError, match='pickles are never loaded'):
        anomaly_model.load_feature_file(str(path))
    assert not marker.exists()


def test_pickle_inside_an_npz_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = str(tmp_path / 'train.pkl')
    with open(path, 'wb') as f:
        np.savez(f, meta=np.array([Payload(marker)], dtype=object))
    with pytest.raises(FeatureFileError, match='damaged or not a feature file'):
        anomaly_model.load_feature_file(path)
    assert not marker.exists()


def test_feature_file_version_and_format_checked(tmp_path):
    meta, image_model, pixel_model = fitted_models()
    path = str(tmp_path / 'f.pkl')
    anomaly_model.save_feature_file(path, meta, image_model, pixel_model)
    content = dict(np.load(path))
    content['meta'] = np.array(str(content['meta']).replace('"version": 1', '"version": 99'))
    with open(path, 'wb') as f:
        np.savez(f, **content)
    with pytest.raises(FeatureFileError, match='version 99'):
        anomaly_model.load_feature_file(path)
    with pytest.raises(FeatureFileError, match='not found'):
        anomaly_model.load_feature_file(str(tmp_path / 'none.pkl'))


def test_pooling_matrix_integer_and_fractional_factors():
    rng = np.random.default_rng(6)
    maps = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    pool = anomaly_model._pooling_matrix(56, 14)
    np.testing.assert_allclose(pool.T @ maps @ pool, maps.reshape(2, 3, 14, 4, 14, 4).mean(axis=(3, 5)), atol=1e-6)
    fractional = anomaly_model._pooling_matrix(65, 17)
    np.testing.assert_allclose(fractional.sum(axis=0), 1, rtol=1e-6)  # each cell is an average
    np.testing.assert_allclose(np.ones(65, np.float32) @ fractional, 1, rtol=1e-6)
    assert (fractional > 0).sum(axis=0).max() <= 5  # each cell covers about 65 / 17 pixels
