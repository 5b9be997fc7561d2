"""The command line, end to end on the bundled sample data, and every error path."""
import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

import mahalanobisad
from detector import Detector
from tests.conftest import REPO, Payload

SAMPLE_DEFECTS = sorted(f for f in os.listdir(os.path.join(REPO, 'images')) if not f.startswith('good'))


def cli(args, model_dir, capsys=None):
    """Run the tool in-process; returns (exit code, stderr)."""
    code = mahalanobisad.run(args + ['--model_dir', model_dir])
    return code, capsys.readouterr().err if capsys else ''


def test_end_to_end_on_sample_data(tmp_path, model_dir):
    """The README's run command as a user runs it: a subprocess in the repository root."""
    report = tmp_path / 'out.json'
    result = subprocess.run(
        [sys.executable, 'mahalanobisad.py', '--feat', str(tmp_path / 'train.pkl'), '--savepath', str(tmp_path / 'fig'),
         '--model_dir', model_dir, '--json', str(report)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    out = json.loads(report.read_text())
    assert out['model'] == 'efficientnet-lite0'
    assert out['threshold_source'] == 'F1-optimal on images + gt_masks'
    assert out['pixel_threshold'] > 0
    assert len(out['images']) == 16
    for image in out['images']:
        assert image['path'].startswith('images' + os.sep)
        is_defect = not os.path.basename(image['path']).startswith('good')
        assert image['anomaly'] == is_defect, image  # F1 = 1 on the sample set
        assert (image['score'] >= out['threshold']) == image['anomaly']
    figures = sorted(os.listdir(tmp_path / 'fig'))
    assert len(figures) == 16 and figures[0] == 'broken_large_000.png'
    assert 'images/good_000.png : score' in result.stderr and '-> normal' in result.stderr


@pytest.fixture(scope='module')
def fitted(tmp_path_factory, small_train, model_dir):
    """A feature file fitted on 12 sample images, reused by the tests below."""
    feat = str(tmp_path_factory.mktemp('feat') / 'small.pkl')
    assert cli(['-tr', small_train, '-f', feat, '-i', 'images/good_000.png', '--no_figures'], model_dir)[0] == 0
    return feat


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_single_input_figure_threshold_override_and_reuse(tmp_path, fitted, model_dir, capsys, caplog):
    caplog.set_level('INFO')
    report, figure = str(tmp_path / 'r.json'), str(tmp_path / 'one.png')
    code, err = cli(['-f', fitted, '-tr', str(tmp_path / 'no_such_train'), '-i', 'images/broken_small_000.png',
                     '-s', figure, '-th', '1e9', '--json', report], model_dir, capsys)
    assert code == 0, err
    out = read_json(report)
    assert out['threshold'] == 1e9 and out['threshold_source'] == '--threshold'
    assert out['images'][0]['anomaly'] is False
    assert cv2.imread(figure) is not None
    assert 'train images not read' in caplog.text


def test_fallback_threshold_without_ground_truth(tmp_path, fitted, model_dir, capsys):
    report = str(tmp_path / 'r.json')
    empty_gt = tmp_path / 'gt'
    empty_gt.mkdir()
    code, err = cli(['-f', fitted, '-i', 'images', '--gt_dir', str(empty_gt), '--no_figures', '--json', report],
                    model_dir, capsys)
    assert code == 0, err
    out = read_json(report)
    assert out['threshold_source'] == 'training hold-out'
    # The largest held-out score of the n = 12 training images: a new normal image is flagged with
    # probability at most 1 / 13 (good images above it are allowed at that rate, defects score far higher).
    assert out['threshold'] == max(Detector.load(fitted, model_dir=model_dir).meta_['holdout_scores'])
    assert out['n_holdout'] == 12 and out['target_fpr'] == pytest.approx(1 / 13)
    scores = {os.path.basename(i['path']): i['score'] for i in out['images']}
    assert sum(v >= out['threshold'] for k, v in scores.items() if not k.startswith('good')) >= 10


def test_augmented_fit_is_reproducible(tmp_path, small_train, model_dir):
    files = []
    for name in ('a.pkl', 'b.pkl'):
        files.append(str(tmp_path / name))
        assert cli(['-tr', small_train, '-f', files[-1], '-a', '-an', '2', '--seed', '3', '--no_figures',
                    '-i', 'images/good_000.png', '--json', str(tmp_path / (name + '.json'))], model_dir)[0] == 0
    a, b = np.load(files[0]), np.load(files[1])
    assert json.loads(str(a['meta']))['aug_num'] == 2
    for key in a.files:
        if key != 'meta':
            np.testing.assert_array_equal(a[key], b[key])
    metas = [json.loads(str(f['meta'])) for f in (a, b)]
    for meta in metas:  # the history records when each fit ran
        assert [entry.pop('time') for entry in meta['history']]
    assert metas[0] == metas[1]
    reports = [read_json(tmp_path / f'{name}.pkl.json') for name in 'ab']
    for report in reports:
        assert [entry.pop('time') for entry in report['history']]
    assert reports[0] == reports[1]


def test_default_feature_file_fitted_differently_is_not_reused(tmp_path, small_train, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(small_train, 'train')
    base = ['-i', os.path.join(REPO, 'images', 'good_000.png'), '--no_figures']
    assert cli(base, model_dir, capsys)[0] == 0
    assert os.path.isfile('train.pkl')
    code, err = cli(base + ['--aug'], model_dir, capsys)
    assert code == 1 and 'train.pkl was fitted differently: aug False here True' in err


def test_feature_file_of_another_backbone_is_refused(tmp_path, fitted, model_dir, capsys):
    code, err = cli(['-f', fitted, '-m', 'lite1', '-i', 'images/good_000.png', '--no_figures'], model_dir, capsys)
    assert code == 1
    assert "cannot be used with this backbone and method: backbone 'efficientnet-lite0' here 'efficientnet-lite1'" in err
    assert len(err.strip().splitlines()) == 1  # the file's input size is kept (--input_size): only the backbone differs


def test_malicious_feature_file_is_refused_not_refitted(tmp_path, small_train, model_dir, capsys):
    marker, feat = tmp_path / 'payload_ran', tmp_path / 'train.pkl'
    import pickle
    feat.write_bytes(pickle.dumps(Payload(marker)))
    before = feat.read_bytes()
    code, err = cli(['-f', str(feat), '-tr', small_train, '-i', 'images/good_000.png', '--no_figures'], model_dir, capsys)
    assert code == 1 and 'pickles are never loaded' in err
    assert not marker.exists() and feat.read_bytes() == before


def test_corrupt_image_among_many_is_skipped(tmp_path, fitted, model_dir, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    shutil.copy(os.path.join(REPO, 'images', 'good_000.png'), folder / 'a.png')
    (folder / 'b.png').write_bytes(b'\x89PNG broken')
    report = str(tmp_path / 'r.json')
    code, err = cli(['-f', fitted, '-i', str(folder), '-s', str(tmp_path / 'figs'), '--json', report], model_dir, capsys)
    assert code == 0, err
    assert [os.path.basename(i['path']) for i in read_json(report)['images']] == ['a.png']
    assert os.listdir(tmp_path / 'figs') == ['a.png']


def make_dir_with(tmp_path, name, count, corrupt=0):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(count):
        shutil.copy(os.path.join(REPO, 'train', sorted(os.listdir(os.path.join(REPO, 'train')))[i]), folder / f'{i}.png')
    for i in range(corrupt):
        (folder / f'bad{i}.png').write_bytes(b'not an image')
    return str(folder)


@pytest.mark.parametrize('case, message', [
    ('missing_input', 'no such file or directory'),
    ('empty_input', 'no images'),
    ('single_corrupt_input', 'cannot decode'),
    ('missing_train', 'no such file or directory'),
    ('one_train_image', 'need at least 2 readable training images, found 1'),
    ('unknown_model', "unknown model 'b99'"),
    ('mask_size_mismatch', 'but its image is'),
    ('savepath_file_for_many', '--savepath must be a directory'),
    ('unwritable_savepath', 'cannot write'),
])
def test_errors_are_one_line_with_nonzero_exit(tmp_path, case, message, fitted, model_dir, capsys):
    args = ['-f', fitted, '-i', 'images/good_000.png', '--no_figures']
    if case == 'missing_input':
        args = ['-f', fitted, '-i', str(tmp_path / 'nope.png')]
    elif case == 'empty_input':
        (tmp_path / 'empty').mkdir()
        args = ['-f', fitted, '-i', str(tmp_path / 'empty')]
    elif case == 'single_corrupt_input':
        (tmp_path / 'x.png').write_bytes(b'garbage')
        args = ['-f', fitted, '-i', str(tmp_path / 'x.png'), '-s', str(tmp_path / 'x_fig.png')]
    elif case == 'missing_train':
        args += ['-f', str(tmp_path / 'new.pkl'), '-tr', str(tmp_path / 'no_train')]
    elif case == 'one_train_image':
        args += ['-f', str(tmp_path / 'new.pkl'), '-tr', make_dir_with(tmp_path, 'train', 1, corrupt=2)]
    elif case == 'unknown_model':
        args += ['-m', 'b99']
    elif case == 'mask_size_mismatch':
        test_dir, gt_dir = tmp_path / 't', tmp_path / 'g'
        test_dir.mkdir(), gt_dir.mkdir()
        shutil.copy(os.path.join(REPO, 'images', 'good_000.png'), test_dir / 'a.png')
        cv2.imwrite(str(gt_dir / 'a_mask.png'), np.zeros((10, 10), np.uint8))
        args = ['-f', fitted, '-i', str(test_dir), '--test_dir', str(test_dir), '--gt_dir', str(gt_dir), '--no_figures']
    elif case == 'savepath_file_for_many':
        args = ['-f', fitted, '-i', 'images', '-s', str(tmp_path / 'x.png')]
    elif case == 'unwritable_savepath':
        (tmp_path / 'afile').write_text('x')
        args = ['-f', fitted, '-i', 'images/good_000.png', '-s', str(tmp_path / 'afile' / 'fig.png')]
    code, err = cli(args, model_dir, capsys)
    assert code == 1
    lines = [line for line in re.split(r'[\r\n]', err) if line.startswith('mahalanobisad.py: error:')]
    assert len(lines) == 1 and message in lines[0], err
    assert 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'x_fig.png') and not os.path.exists(tmp_path / 'new.pkl')


@pytest.mark.parametrize('flag, value', [('--batch_size', '0'), ('--aug_num', '-1'), ('--threshold', 'nan'),
                                         ('--seed', 'x'), ('--seed', '-1'), ('--max_pixels', '0'),
                                         ('--test_dir', '/no/such/dir'), ('--gt_dir', '/no/such/dir'),
                                         ('--json', '/'), ('--feat', 'x' * 300)])
def test_bad_flag_values(flag, value, model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mahalanobisad.parse_args([flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err


@pytest.mark.parametrize('method', ['padim', 'spade', 'patchcore'])
def test_other_methods_fit_save_reuse_and_refuse_a_mismatch(method, tmp_path, small_train, model_dir, capsys):
    feat, report = str(tmp_path / f'{method}.pkl'), str(tmp_path / 'r.json')
    args = ['-tr', small_train, '-f', feat, '-i', 'images', '--no_figures', '--method', method,
            '--padim_dims', '50', '--spade_k', '5', '--coreset_ratio', '0.2']
    assert cli(args + ['--json', report], model_dir)[0] == 0
    first = read_json(report)
    assert json.loads(str(np.load(feat)['meta']))['method'] == method
    assert first['pixel_threshold'] is not None and len(first['images']) == 16
    defects = [i['score'] for i in first['images'] if 'good' not in i['path']]
    goods = [i['score'] for i in first['images'] if 'good' in i['path']]
    assert np.mean(defects) > np.mean(goods)
    assert cli(args + ['--json', report], model_dir)[0] == 0  # reused: identical results, stored thresholds
    again = read_json(report)
    assert again.pop('threshold_source') == 'stored: ' + first.pop('threshold_source') and again == first
    other = 'padim' if method != 'padim' else 'spade'
    code, err = cli(['-f', feat, '-i', 'images/good_000.png', '--no_figures', '--method', other], model_dir, capsys)
    assert code == 1 and f"method '{method}' here '{other}'" in err
