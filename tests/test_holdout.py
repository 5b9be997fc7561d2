"""Thresholds for a stated false-positive rate, and fits that leave out defective training images."""
import json
import os

import numpy as np
import pytest

import anomaly_model
import evaluate
import holdout
import image_utils
import mahalanobisad
import thresholds
from thresholds import conformal_threshold
from detector import Detector, UsageError
from tests import hostile
from tests.conftest import REPO

DEFECTS = [os.path.join(REPO, 'images', name) for name in ('broken_large_000.png', 'contamination_000.png')]


# ----------------------------------------------------------------------------------------------
# the conformal order statistic
# ----------------------------------------------------------------------------------------------

def test_conformal_threshold_is_the_exact_order_statistic():
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 100.0))  # n = 99, shuffled
    assert conformal_threshold(scores, 0.1) == (90.0, True)    # k = ceil(100 * 0.9) = 90
    assert conformal_threshold(scores, 0.05) == (95.0, True)   # k = ceil(95) = 95
    assert conformal_threshold(scores, 0.011) == (99.0, True)  # k = ceil(98.9) = 99
    assert conformal_threshold(scores, 0.01) == (99.0, True)   # n = 1/0.01 - 1: just certifiable
    assert conformal_threshold(scores, 1 / 100) == (99.0, True)  # 1/(n + 1): the largest score
    assert conformal_threshold(scores, 0.5) == (50.0, True)


def test_conformal_threshold_with_too_few_scores_is_the_largest_and_not_certified():
    assert conformal_threshold([3.0, 1.0, 2.0], 0.05) == (3.0, False)  # 3 < 1/0.05 - 1 = 19
    assert conformal_threshold(np.arange(18.0), 0.05) == (17.0, False)
    assert conformal_threshold(np.arange(19.0), 0.05) == (18.0, True)


@pytest.mark.parametrize('n, source, rank_from_top, target', [
    (12, 'training hold-out', 1, 1 / 13),  # too few images to certify 0.01: the largest score
    (99, 'training hold-out, default FPR 0.01', 1, 0.01),
    (209, 'training hold-out, default FPR 0.01', 2, 0.01)])  # k = ceil(210 * 0.99) = 208 of 209
def test_default_threshold_is_fpr_001_where_the_images_certify_it(n, source, rank_from_top, target):
    scores = np.random.default_rng(n).permutation(np.arange(n, dtype=np.float64))
    chosen = thresholds.from_holdout(holdout.HoldoutScores(scores, scores), log=False)
    assert chosen.source == source and chosen.target_fpr == pytest.approx(target)
    assert chosen.image == chosen.pixel == n - rank_from_top


def test_conformal_threshold_keeps_its_false_positive_rate():
    """Exchangeable normal scores: a new one reaches the threshold with probability (n + 1 - k) / (n + 1)."""
    rng = np.random.default_rng(1)
    calibration, new = rng.standard_normal((20000, 39)), rng.standard_normal(20000)
    thresholds = np.array([conformal_threshold(row, 0.1)[0] for row in calibration])
    rate = np.mean(new >= thresholds)                  # k = 36: exactly 4 / 40 = 0.1
    assert 0.09 < rate <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / 20000)


# ----------------------------------------------------------------------------------------------
# leave one image out: the held-out scores without refitting, against refits
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['mahalanobis', 'padim', 'spade'])
def test_held_out_scores_equal_a_refit_without_the_image(name):
    """Each image's held-out score and map maximum equal those of the method refitted on the other images
    (its augmented copies left out with it), for the Gaussians' exact downdates and SPADE's search."""
    rng = np.random.default_rng(7)
    method = anomaly_model.make_method(name, padim_dims=12, spade_k=3)
    method.configure(hostile.SHAPES, hostile.INPUT_SIZE)
    groups = np.repeat(np.arange(16), 2)  # 16 images, each with one augmented copy
    maps = [rng.standard_normal((32,) + shape).astype(np.float32) for shape in hostile.SHAPES]
    features = method.features(maps)
    scores, maxima = holdout.holdout_scores(method.fit(features), features, groups, hostile.INPUT_SIZE)
    for image in (0, 5, 15):
        refit = anomaly_model.make_method(name, padim_dims=12, spade_k=3)
        refit.params = dict(method.params)
        refit.fit(anomaly_model.select_features(features, groups != image))
        expected, expected_maps = refit.score(anomaly_model.select_features(features, [2 * image]), hostile.INPUT_SIZE)
        assert scores[image] == pytest.approx(expected[0], rel=1e-4)
        assert maxima[image] == pytest.approx(expected_maps.max(), rel=1e-4)
        in_sample = method.score(anomaly_model.select_features(features, [2 * image]), hostile.INPUT_SIZE)[0][0]
        assert scores[image] > in_sample


def test_leave_one_out_thresholds_keep_their_rate_on_gaussian_data():
    """Normal data, a Gaussian with nearly as many dimensions as images (the case that made k-fold
    thresholds twice too high): the conformal threshold on the leave-one-out scores flags new normal
    samples, scored by the model fitted on all images, at the nominal rate (n + 1 - k) / (n + 1), within
    3 standard errors of the mean over fits."""
    rng = np.random.default_rng(11)
    dims, n, fpr, fits = 20, 39, 0.1, 40
    rates = []
    for _ in range(fits):
        mixing = rng.standard_normal((dims, dims)) / np.sqrt(dims)
        train = (rng.standard_normal((n, dims)) @ mixing)[:, None].astype(np.float32)  # one position
        new = (rng.standard_normal((2000, dims)) @ mixing)[:, None].astype(np.float32)
        gaussian = anomaly_model.PixelGaussian().fit(train)
        threshold = conformal_threshold(gaussian.leave_out_distances(train, np.arange(n))[:, 0], fpr)[0]
        rates.append(np.mean(gaussian.distances(new)[:, 0] >= threshold))
    nominal = (n + 1 - np.ceil((n + 1) * (1 - fpr))) / (n + 1)  # k = 36: 4 / 40
    assert abs(np.mean(rates) - nominal) <= 3 * np.std(rates) / np.sqrt(fits)


# ----------------------------------------------------------------------------------------------
# the outlier rule and the contamination rounds, on synthetic features
# ----------------------------------------------------------------------------------------------

def test_robust_outliers_flags_only_the_far_upper_tail():
    rng = np.random.default_rng(2)
    normal = rng.standard_normal(200)
    assert not holdout.robust_outliers(normal).any()
    mixed = np.r_[normal, 10 + rng.standard_normal(20), [-15.0]]
    flagged = holdout.robust_outliers(mixed)
    assert flagged[200:220].all() and not flagged[:200].any() and not flagged[-1]  # low scores are never defects


def synthetic(n_normal=60, n_planted=6, copies=1, seed=3):
    """Pooled 4-dim features of normal images and planted outliers (the last n_planted source images)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_normal + n_planted, 4))
    base[n_normal:] += rng.choice([-1, 1], (n_planted, 4)) * 4
    groups = np.repeat(np.arange(n_normal + n_planted), copies)
    pooled = base[groups] + 0.05 * rng.standard_normal((len(groups), 4))
    method = anomaly_model.MahalanobisMethod()
    method.configure([(4, 1, 1)], 224)  # one pooled output: image-level only
    return method, {'pooled0': pooled.astype(np.float32)}, groups


@pytest.mark.parametrize('copies', [1, 3])
def test_contamination_auto_finds_the_planted_outliers(copies):
    method, features, groups = synthetic(copies=copies)
    kept, excluded = holdout.holdout_without_outliers(method, features, groups, 16, 'auto')
    assert sorted(group for group, _, _ in excluded) == list(range(60, 66))
    np.testing.assert_array_equal(kept, groups < 60)  # every copy of an excluded image goes
    assert holdout.holdout_without_outliers(method, features, groups, 16, 'auto')[1] == excluded  # deterministic


def test_contamination_fraction_drops_that_share_and_none_drops_nothing():
    method, features, groups = synthetic()
    kept, excluded = holdout.holdout_without_outliers(method, features, groups, 16, 0.1)
    assert len(excluded) == 7 and {60, 61, 62, 63, 64, 65} <= {group for group, _, _ in excluded}  # round(6.6)
    assert {round_ for _, _, round_ in excluded} <= {1, 2, 3} and kept.sum() == 66 - 7
    kept, excluded = holdout.holdout_without_outliers(method, features, groups, 16, None)
    assert kept.all() and excluded == []


def test_contamination_auto_on_clean_features_excludes_little():
    method, features, groups = synthetic(n_normal=100, n_planted=0)
    excluded = holdout.holdout_without_outliers(method, features, groups, 16, 'auto')[1]
    assert len(excluded) <= 2


# ----------------------------------------------------------------------------------------------
# the Detector and the command line on the sample data
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def train_paths(small_train):
    return image_utils.list_images(small_train)


@pytest.fixture(scope='module')
def padim(train_paths, model_dir):
    return Detector(method='padim', model_dir=model_dir, padim_dims=50).fit(train_paths)


def test_fpr_thresholds_are_the_order_statistics_of_the_holdout(padim, caplog):
    n = len(padim.meta_['holdout_scores'])
    assert n == 12 and len(padim.meta_['holdout_pixel_maxima']) == 12
    ordered, maxima = np.sort(padim.meta_['holdout_scores']), np.sort(padim.meta_['holdout_pixel_maxima'])
    padim.use_holdout_thresholds(fpr=0.25)  # k = ceil(13 * 0.75) = 10
    assert padim.threshold_ == ordered[9] and padim.pixel_threshold_ == maxima[9]
    assert padim.threshold_source_ == 'training hold-out, FPR 0.25' and padim.target_fpr_ == 0.25
    padim.use_holdout_thresholds()  # the default: the largest, stated as FPR 1/(n + 1)
    assert padim.threshold_ == ordered[-1] == padim.meta_['holdout_thresholds']['image']
    assert padim.pixel_threshold_ == maxima[-1] == padim.meta_['holdout_thresholds']['pixel']
    assert padim.threshold_source_ == 'training hold-out' and padim.target_fpr_ == pytest.approx(1 / 13)
    padim.use_holdout_thresholds(fpr=0.05)  # 12 < 1/0.05 - 1: cannot be certified
    assert padim.threshold_ == ordered[-1] and 'cannot guarantee FPR 0.05' in caplog.text
    assert padim.target_fpr_ == pytest.approx(1 / 13)
    with pytest.raises(UsageError, match='fpr must be in'):
        padim.use_holdout_thresholds(fpr=1.5)


def test_calibration_without_a_class_falls_back_to_the_stated_holdout_rate(padim, caplog):
    normal = [os.path.join(REPO, 'images', f'good_{i:03d}.png') for i in (0, 5)]
    padim.calibrate(normal, [None, None])
    assert padim.threshold_source_ == 'training hold-out' and padim.target_fpr_ == pytest.approx(1 / 13)
    padim.calibrate(DEFECTS, [os.path.join(REPO, 'gt_masks', os.path.basename(p)[:-4] + '_mask.png')
                              for p in DEFECTS])
    assert 'no normal images' in caplog.text and padim.threshold_source_ == 'training hold-out'


def test_contaminated_sample_training_set(train_paths, model_dir, tmp_path, caplog):
    """Two defect images among the 12 good ones: auto leaves both out, names them, and records them."""
    detector = Detector(method='padim', padim_dims=50, model_dir=model_dir, contamination='auto')
    detector.fit(train_paths + DEFECTS)
    excluded = detector.meta_['excluded_train_images']
    assert set(DEFECTS) <= set(excluded) and len(excluded) <= 3
    assert detector.meta_['n_train_images'] == len(detector.meta_['holdout_scores']) == 14 - len(excluded)
    assert all('excluded training image' in caplog.text and path in caplog.text for path in excluded)
    clean = Detector(method='padim', padim_dims=50, model_dir=model_dir).fit(train_paths + DEFECTS)
    assert clean.meta_['excluded_train_images'] == [] and clean.meta_['n_train_images'] == 14
    detector.save(str(tmp_path / 'auto.pkl'))
    assert Detector.load(str(tmp_path / 'auto.pkl'), model_dir=model_dir).meta_['excluded_train_images'] == excluded


def test_mahalanobis_is_screened_by_padim_scores(train_paths, model_dir, caplog):
    """MahalanobisAD's pooled image scores are not what finds defective training images: PaDiM's
    held-out scores on the same backbone outputs are (plain views only, also with augmentation)."""
    detector = Detector(method='mahalanobis', padim_dims=50, aug_num=1, model_dir=model_dir, contamination='auto')
    detector.fit(train_paths + DEFECTS)
    excluded = detector.meta_['excluded_train_images']
    assert set(DEFECTS) <= set(excluded) and len(excluded) <= 3
    assert 'held-out padim score' in caplog.text
    assert detector.method_.name == 'mahalanobis' and detector.meta_['n_train_images'] == 14 - len(excluded)
    screen = Detector(method='padim', padim_dims=50, model_dir=model_dir, contamination='auto')  # plain views
    assert screen.fit(train_paths + DEFECTS).meta_['excluded_train_images'] == excluded


def test_cli_fpr_and_contamination(train_paths, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    train = tmp_path / 'train'
    train.mkdir()
    for path in train_paths + DEFECTS:
        os.symlink(path, train / os.path.basename(path))
    report, feat = str(tmp_path / 'r.json'), str(tmp_path / 'f.pkl')
    args = ['-tr', str(train), '-f', feat, '-i', 'images', '--no_figures', '--json', report, '--model_dir', model_dir,
            '--method', 'padim', '--padim_dims', '50']
    assert mahalanobisad.run(args + ['--contamination', '0.15', '--fpr', '0.2']) == 0  # round(0.15 * 14) = 2
    with open(report) as f:
        out = json.load(f)
    assert sorted(out['excluded_train_images']) == sorted(str(train / os.path.basename(p)) for p in DEFECTS)
    assert out['threshold_source'] == 'training hold-out, FPR 0.2' and out['target_fpr'] == 0.2
    assert out['n_holdout'] == 12  # --fpr wins over the labelled images/ + gt_masks/


@pytest.mark.parametrize('flag, value, message', [
    ('--fpr', '0', 'must be in (0, 1)'), ('--fpr', '1', 'must be in (0, 1)'), ('--fpr', 'x', 'invalid'),
    ('--contamination', '0.5', "'auto' or a fraction"), ('--contamination', 'most', 'invalid'),
    ('--contaminate', '0', 'must be in (0, 1)'), ('--contaminate', '1', 'must be in (0, 1)'),
])
def test_bad_holdout_flag_values(flag, value, message, capsys):
    parsers = [evaluate.parse_args] + ([] if flag == '--contaminate' else [mahalanobisad.parse_args])
    for parse in parsers:
        with pytest.raises(SystemExit) as exit_info:
            parse([flag, value, '--data_path', 'x'] if parse is evaluate.parse_args else [flag, value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err and flag in err


def test_threshold_and_fpr_together_is_a_one_line_error(capsys, model_dir):
    assert mahalanobisad.run(['--fpr', '0.1', '--threshold', '3', '--model_dir', model_dir]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'mahalanobisad.py: error: --threshold and --fpr both set the image threshold: give one of them'


@pytest.mark.parametrize('value', [0, 0.5, -0.1, 'some', True])
def test_bad_contamination_in_the_api(value):
    with pytest.raises(UsageError, match='contamination must be'):
        Detector(contamination=value)
