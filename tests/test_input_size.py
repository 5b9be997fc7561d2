"""Input sizes (one larger window, or several fused) and the augmentation's rotation range: the
fusion's formula, the feature file across sizes, the export at other sizes, bad values."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import feature_file
import fusion
import image_utils
import mahalanobisad
from detector import Detector
from errors import FeatureFileError, UsageError
from holdout import HoldoutScores
from tests.conftest import REPO

SAMPLE = sorted(image_utils.list_images(os.path.join(REPO, 'images')))[::2]
SIZES = (64, 96)  # small, so that fitting and exporting stay quick; the code paths are those of 224 / 384
OPTIONS = {'coreset_ratio': 0.2}


@pytest.fixture(scope='module')
def train_paths(small_train):
    return image_utils.list_images(small_train)


@pytest.fixture(scope='module')
def detectors(train_paths, model_dir):
    """PatchCore fitted at each of SIZES alone and at both, on the same 12 images."""
    fitted = {size: Detector(method='patchcore', model_dir=model_dir, input_size=size, **OPTIONS).fit(train_paths)
              for size in SIZES}
    fitted[SIZES] = Detector(method='patchcore', model_dir=model_dir, input_size=list(SIZES),
                             **OPTIONS).fit(train_paths)
    return fitted


def test_fuse_is_the_largest_z_score_on_a_constructed_case():
    held_out = [HoldoutScores(np.array([1.0, 2.0, 3.0]), np.array([4.0, 6.0, 8.0])),
                HoldoutScores(np.array([10.0, 20.0, 60.0]), np.array([1.0, 1.0, 4.0]))]
    footings = [fusion.Footing.of(h) for h in held_out]
    assert footings[0] == fusion.Footing(2.0, 1.0, 6.0, 2.0)
    assert footings[1] == fusion.Footing(30.0, np.sqrt(700), 2.0, np.sqrt(3))
    scores = [np.array([2.0, 5.0, 0.0]), np.array([30.0 + 2 * np.sqrt(700), 30.0, 30.0 - np.sqrt(700)])]
    np.testing.assert_allclose(fusion.fuse(scores, footings), [2.0, 3.0, -1.0])  # max(0, 2), max(3, 0), max(-2, -1)
    maps = [np.full((1, 2, 2), 8.0), np.full((1, 2, 2), 2.0 + 3 * np.sqrt(3))]
    np.testing.assert_allclose(fusion.fuse(maps, footings, 'pixel'), np.full((1, 2, 2), 3.0))
    fused = fusion.fuse_holdout(held_out, footings)  # the held-out images' fused scores, image for image
    np.testing.assert_allclose(fused.image, [max(-1, -20 / np.sqrt(700)), max(0, -10 / np.sqrt(700)),
                                             max(1, 30 / np.sqrt(700))])
    np.testing.assert_allclose(fused.pixel_maxima, np.max([[-1, 0, 1], np.array([-1, -1, 2]) / np.sqrt(3)], axis=0))
    identical = fusion.Footing.of(HoldoutScores(np.array([5.0, 5.0])))  # duplicate training images: no 0 spread
    assert identical.image_std > 0 and identical.pixel_mean is None


def test_fused_detector_scores_by_the_documented_formula(detectors):
    """Each scale of the fused detector is the detector fitted at that size alone; the fused score is
    the largest of their scores standardised by their own held-out scores; thresholds come from the
    fused held-out scores."""
    fused = detectors[SIZES]
    singles = [detectors[size] for size in SIZES]
    assert fused.input_sizes == SIZES and fused.output_size == 96 and len(fused.methods_) == 2
    for single, scale in zip(singles, fused.meta_['scale_holdout']):
        np.testing.assert_allclose(scale['holdout_scores'], single.meta_['holdout_scores'])
    raw = [single.decision_function(SAMPLE) for single in singles]
    expected = np.max([(r - np.mean(s.meta_['holdout_scores'])) / np.std(s.meta_['holdout_scores'], ddof=1)
                       for r, s in zip(raw, singles)], axis=0)
    np.testing.assert_allclose(fused.decision_function(SAMPLE), expected, rtol=1e-6)
    assert fused.threshold_ == max(fused.meta_['holdout_scores'])
    result = next(fused.inspect(SAMPLE[:1]))
    assert result.view.shape == (96, 96, 3) and result.anomaly_map.shape == (96, 96)


def test_contamination_with_several_sizes_screens_at_the_first_and_fits_every_size_without_them(
        train_paths, model_dir):
    detector = Detector(method='patchcore', model_dir=model_dir, input_size=list(SIZES), contamination=0.1,
                        **OPTIONS).fit(train_paths)
    excluded = detector.meta_['excluded_train_images']
    assert len(excluded) == 1 and detector.meta_['n_train_images'] == 11
    assert [len(scale['holdout_scores']) for scale in detector.meta_['scale_holdout']] == [11, 11]
    assert detector.threshold_ == max(detector.meta_['holdout_scores'])
    assert all(method.bank_rows_.max() < 11 for method in detector.methods_)  # banks of the 11 kept images


def test_feature_file_fitted_at_one_size_is_refused_at_another(detectors, tmp_path, model_dir, capsys):
    path = str(tmp_path / 'small.pkl')
    detectors[96].save(path)
    with pytest.raises(FeatureFileError, match='fitted at input size 96, not 64 96: pass --feat with a new file'):
        Detector.load(path, model_dir=model_dir, input_size=[96, 64])
    assert Detector.load(path, model_dir=model_dir).input_sizes == (96,)  # no size asked: the file's
    code = mahalanobisad.run(['-f', path, '--method', 'patchcore', '--input_size', '224', '-i', SAMPLE[0],
                              '--no_figures', '--model_dir', model_dir])
    assert code == 1 and 'small.pkl was fitted at input size 96, not 224' in capsys.readouterr().err


def test_fused_feature_file_round_trip_and_checks_per_scale(detectors, tmp_path, model_dir):
    path = str(tmp_path / 'fused.pkl')
    detectors[SIZES].save(path)
    meta, methods, _ = feature_file.load(path)
    assert meta['input_size'] == [64, 96] and meta['resize_size'] == [73, 110] and len(methods) == 2
    loaded = Detector.load(path, model_dir=model_dir)
    np.testing.assert_allclose(loaded.decision_function(SAMPLE), detectors[SIZES].decision_function(SAMPLE))
    assert loaded.threshold_ == detectors[SIZES].threshold_
    arrays = dict(np.load(path))
    damaged = str(tmp_path / 'damaged.pkl')
    for change, message in [(lambda a: a.pop('input96_memory_bank'), 'missing arrays input96_memory_bank'),
                            (lambda a: a.update(input64_bank_centroids=a['input64_bank_centroids'][:, :5]),
                             'array input64_bank_centroids has shape'),
                            (lambda a: a.update(input96_memory_bank=a['input96_memory_bank'] * np.nan), 'not finite')]:
        copy = dict(arrays)
        change(copy)
        np.savez(damaged, **copy)
        os.replace(damaged + '.npz', damaged)
        with pytest.raises(FeatureFileError, match=message):
            Detector.load(damaged, model_dir=model_dir)


@pytest.mark.parametrize('sizes', [96, SIZES], ids=['one size', 'fused'])
def test_export_at_other_sizes_scores_like_the_tool(sizes, detectors, tmp_path):
    detector = detectors[sizes]
    tool = list(detector.inspect(SAMPLE))
    scores = np.array([t.score for t in tool])
    path = str(tmp_path / 'model.onnx')
    detector.export(path, (256, 256))
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {'image': np.stack([image_utils.load_image(p) for p in SAMPLE])})))
    # Fused scores are z-scores, near 0 for normal images: relative to the score's scale (at least 1).
    assert np.max(np.abs(out['score'] - scores) / np.maximum(np.abs(scores), 1)) < 1e-4
    maps = np.stack([t.anomaly_map for t in tool])
    assert out['anomaly_map'].shape == maps.shape == (len(SAMPLE), 96, 96)
    np.testing.assert_allclose(out['anomaly_map'], maps, atol=1e-3 * np.abs(maps).max())
    if sizes == SIZES:  # one copy of the backbone's weights, shared by both sizes
        initializers = [i.name for i in onnx.load(path).graph.initializer if i.name.startswith('backbone')]
        assert initializers and all(name.startswith('backbone/') for name in initializers)


@pytest.mark.parametrize('flags, message', [
    (['--input_size', '100'], 'input_size 100 is not a multiple of 32 in 64..1024'),
    (['--input_size', '32'], 'input_size 32 is not a multiple of 32 in 64..1024'),
    (['--input_size', 'big'], "invalid input_size_value value: 'big'"),
    (['--aug', '--aug_rotate', '-5'], 'aug_rotate must be a number of degrees in 0..180'),
    (['--aug', '--aug_rotate', '181'], 'aug_rotate must be a number of degrees in 0..180'),
    (['--aug', '--aug_rotate', 'nan'], 'aug_rotate must be a number of degrees in 0..180'),
    (['--aug', '--aug_rotate', 'half'], 'aug_rotate must be a number of degrees in 0..180'),
])
def test_bad_input_size_and_aug_rotate_are_one_line_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        mahalanobisad.parse_args(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_aug_rotate_without_aug_and_repeated_sizes_are_usage_errors(model_dir, capsys):
    needs_aug = '--aug_rotate sets the rotation of augmented copies: it needs --aug'
    for flags, message in [(['--aug_rotate', '90'], needs_aug),
                           (['--input_size', '224', '224'], 'input sizes 224, 224 repeat a size')]:
        assert mahalanobisad.run(flags + ['--model_dir', model_dir]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    for bad in (-1, 200, float('nan'), 'x', True):
        with pytest.raises(UsageError, match='aug_rotate must be'):
            Detector(aug_rotate=bad)
    for bad in (100, [224, 50], 'big', [], 2.5 * 64):
        with pytest.raises(UsageError, match='input_size'):
            Detector(input_size=bad)


def test_aug_rotate_sets_the_rotation_and_is_recorded(train_paths, model_dir, tmp_path):
    image = image_utils.load_image(train_paths[0])
    preprocessing = image_utils.Preprocessing((224,), (0.5,) * 3, (0.25,) * 3)
    turned = image_utils.Preprocessing((224,), (0.5,) * 3, (0.25,) * 3, max_rotation=180)
    same = preprocessing.training_views(image, 0, 2, 0)[0][0]
    assert preprocessing.training_views(image, 0, 0, 0)[0][0][0].tobytes() == same[0].tobytes()  # plain view
    rotated = turned.training_views(image, 0, 2, 0)[0][0]
    np.testing.assert_array_equal(rotated[0], same[0])
    assert not np.array_equal(rotated[1], same[1])  # same draws, 18 times the angle
    detector = Detector(model_dir=model_dir, method='padim', padim_dims=20, aug_num=1, aug_rotate=180,
                        input_size=64).fit(train_paths[:4])
    assert detector.meta_['aug_rotate'] == 180
    path = str(tmp_path / 'turned.pkl')
    detector.save(path)
    assert Detector.load(path, model_dir=model_dir).aug_rotate == 180
