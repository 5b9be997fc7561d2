"""PatchCore at scale: the chunked coreset, the nearest-patch index, hold-out models carved out of the
fit, determinism and the feature file with an index. Synthetic data, small banks."""
import os

import numpy as np
import pytest

import anomaly_model
import feature_file
import holdout
import nearest_neighbours
from anomaly_model import PatchCoreMethod
from nearest_neighbours import NearestPatchIndex
from tests import hostile


def clustered_patches(rng, images=30, patches=100, dims=8, clusters=20):
    """(images, patches, dims) float32 around `clusters` centres of very unequal frequency: a few
    clusters appear in one image only (the rare normal patches a coreset must keep)."""
    centres = rng.uniform(-50, 50, (clusters, dims))
    weights = 1 / np.arange(1, clusters + 1) ** 2
    labels = rng.choice(clusters, (images, patches), p=weights / weights.sum())
    for rare, image in zip(range(clusters - 4, clusters), rng.choice(images, 4, replace=False)):
        labels[labels == rare] = 0
        labels[image, :3] = rare
    return (centres[labels] + rng.standard_normal((images, patches, dims))).astype(np.float32), labels


def coverage(points, bank):
    distances = nearest_neighbours.nearest_distances(points, bank)[0]
    return distances.max(), distances.mean()


def test_chunked_coreset_covers_like_the_exact_greedy():
    rng = np.random.default_rng(20)
    patches, labels = clustered_patches(rng)
    flat = patches.reshape(-1, patches.shape[-1])
    chunked = nearest_neighbours.chunked_coreset(patches, 0.05, chunk_patches=500, seed=0)
    exact = nearest_neighbours.greedy_coreset(flat, len(chunked), seed=0)
    assert len(set(chunked.tolist())) == len(chunked) == 150
    assert set(labels.ravel()[chunked]) == set(labels.ravel())  # every cluster, the rare ones too
    chunked_max, chunked_mean = coverage(flat, flat[chunked])
    exact_max, exact_mean = coverage(flat, flat[exact])
    random_max, _ = coverage(flat, flat[rng.choice(len(flat), len(chunked), replace=False)])
    assert chunked_max <= 1.25 * exact_max < random_max
    assert chunked_mean <= 1.1 * exact_mean


def test_index_agrees_with_brute_force():
    rng = np.random.default_rng(22)
    patches, _ = clustered_patches(rng, images=60, patches=100, dims=16, clusters=40)
    bank = np.ascontiguousarray(patches[:50].reshape(-1, 16))
    centroids = nearest_neighbours.ivf_centroids(bank, seed=0)
    assert centroids.shape == (128, 16) and centroids.dtype == np.float32  # min(2 sqrt(5000), 5000 / 39) lists
    index = NearestPatchIndex(bank, centroids)
    # Near copies of bank rows (as most test patches are): always their own row.
    rows = rng.choice(len(bank), 1000, replace=False)
    near = bank[rows] + 0.01 * rng.standard_normal((1000, 16)).astype(np.float32)
    np.testing.assert_array_equal(index.search(near)[1], rows)
    # New points inside overlapping Gaussian clusters, the index's hardest case (on PatchCore's banks
    # fewer than 1 in 10,000 differ: benchmarks/patchcore_scale.py): close to brute force.
    queries = patches[50:].reshape(-1, 16) + rng.standard_normal((1000, 16)).astype(np.float32)
    distances, indices = index.search(queries)
    exact_distances, exact_indices = nearest_neighbours.nearest_distances(queries, bank)
    brute = np.linalg.norm(queries[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(exact_indices, brute.argmin(axis=1))
    assert np.mean(indices == exact_indices) >= 0.85
    assert np.mean(distances / exact_distances) <= 1.02
    np.testing.assert_allclose(distances, np.linalg.norm(queries - bank[indices], axis=1), rtol=1e-5)
    assert np.all(distances >= brute.min(axis=1) - 1e-3)  # never nearer than the true nearest
    np.testing.assert_array_equal(index.search(queries, exact=True)[1], exact_indices)
    assert NearestPatchIndex(bank[:300], nearest_neighbours.ivf_centroids(bank[:300])).index is None  # small: exact


def fitted_patchcore(seed=0, images=40):
    rng = np.random.default_rng(23)
    method = anomaly_model.make_method('patchcore', coreset_ratio=0.5, seed=seed)
    method.configure(hostile.SHAPES, hostile.INPUT_SIZE)
    features = {'patches': clustered_patches(rng, images=images, patches=256, dims=14)[0][:, :256]}
    groups = np.arange(images)
    return method.fit(features), features, groups


def test_patchcore_is_deterministic_under_a_seed():
    first, second, other = fitted_patchcore(0)[0], fitted_patchcore(0)[0], fitted_patchcore(1)[0]
    assert len(first.centroids_) > 0  # the index is in use
    for key, value in first.state().items():
        np.testing.assert_array_equal(value, second.state()[key])
    assert not np.array_equal(first.centroids_, other.centroids_)  # the index's k-means is seeded


@pytest.mark.parametrize('exact', [False, True])
def test_holdout_searches_the_bank_without_the_images_own_patches(exact):
    """Leave one image out: each training image scored as a new one against the bank without its own
    rows (through the index, and by brute force), its maps' maxima kept for the pixel threshold."""
    method, features, groups = fitted_patchcore()
    method.exact_search = exact
    scores, pixel_max = holdout.holdout_scores(method, features, groups, 64)
    assert scores.shape == (40,) and (pixel_max > 0).all()
    own = np.flatnonzero(method.bank_rows_ == 3)
    assert len(own)  # image 3 has patches in the bank
    in_sample = method.score({'patches': features['patches'][3:4]}, 64)[0][0]
    rows = np.setdiff1d(np.arange(len(method.bank_)), own)
    without = PatchCoreMethod(**method.params).set_bank(method.bank_[rows], method.centroids_)
    without.exact_search = exact
    expected, maps = without.score({'patches': features['patches'][3:4]}, 64)
    assert scores[3] == pytest.approx(expected[0], rel=1e-5) and scores[3] > in_sample
    assert pixel_max[3] == pytest.approx(maps.max(), rel=1e-5)


def test_feature_file_round_trip_with_an_index(tmp_path):
    method, features, _ = fitted_patchcore()
    path = str(tmp_path / 'patchcore.pkl')
    feature_file.save(path, {'backbone': 'x'}, [method])
    with np.load(path, allow_pickle=False) as archive:  # plain numeric arrays only
        assert archive['bank_centroids'].dtype == np.float32 and archive['memory_bank'].dtype == np.float32
    _, (loaded,), _ = feature_file.load(path)
    assert loaded.index_.index is not None
    test = {'patches': features['patches'][:5] + 0.5}
    for a, b in zip(method.score(test, 64), loaded.score(test, 64)):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(tmp_path) == ['patchcore.pkl']


def test_screening_models_are_carved_out_of_one_fold_aligned_coreset():
    """Contamination screening: each fold's model holds the other folds' part of one coreset whose
    chains never straddle folds (no row of its own fold), with one index's centres; together the
    folds' parts are that coreset, and each is what a fit on that fold alone would choose."""
    method, features, groups = fitted_patchcore()
    fold = holdout.holdout_folds(groups)
    models = dict(method.fold_models(features, fold))
    patches = features['patches']
    banks = {k: {row.tobytes() for row in model.bank_} for k, model in models.items()}
    for k in models:
        alone = PatchCoreMethod(**method.params).fit({'patches': patches[fold == k]}).bank_
        own = {row.tobytes() for row in alone}
        assert own.isdisjoint(banks[k]) and all(own <= banks[j] for j in models if j != k)
        np.testing.assert_array_equal(models[k].centroids_, models[(k + 1) % len(models)].centroids_)
    scores = holdout.screening_scores(method, features, groups, 64)
    assert scores.shape == (40,) and np.all(np.isfinite(scores))
