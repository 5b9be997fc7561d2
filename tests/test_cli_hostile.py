"""Hostile and awkward files through the command line (issue 15): what a user sees for each class."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

import mahalanobisad
from tests import hostile
from tests.conftest import REPO

GOOD = os.path.join(REPO, 'images', 'good_000.png')
NOT_UTF8 = os.fsdecode(b'caf\xe9 \xff.png')      # Latin-1 bytes: not valid UTF-8
LONG = 'long_' + 'x' * 240 + '.png'               # 250 characters: the temporary name used to overflow


def cli(args, model_dir, capsys):
    code = mahalanobisad.run(args + ['--model_dir', model_dir])
    return code, capsys.readouterr().err


def error_lines(err):
    return [line for line in re.split(r'[\r\n]', err) if line.startswith('mahalanobisad.py: error:')]


@pytest.fixture(scope='module')
def fitted(tmp_path_factory, small_train, model_dir):
    """A feature file fitted on a training folder that also holds an oversized and a corrupt image."""
    train = tmp_path_factory.mktemp('train_hostile')
    for name in sorted(os.listdir(small_train)):
        shutil.copy(os.path.join(small_train, name), train / name)
    (train / 'zz_huge.png').write_bytes(hostile.png_bytes(30000, 30000, 16, 6))
    (train / 'zz_broken.jpg').write_bytes(b'\xff\xd8\xff' + b'\x00' * 100)
    feat = str(tmp_path_factory.mktemp('feat') / 'hostile.pkl')
    code = mahalanobisad.run(['-tr', str(train), '-f', feat, '-i', GOOD, '--no_figures', '-th', '1',
                              '--model_dir', model_dir])
    assert code == 0
    return feat


def test_training_folder_with_refused_images_fits_on_the_rest(fitted):
    meta = json.loads(str(np.load(fitted)['meta']))
    assert meta['n_train_images'] == 12 and meta['bit_depth'] == 8  # the oversized and the broken one skipped


def test_refused_and_odd_inputs_among_good_ones(tmp_path, fitted, model_dir, capsys):
    folder = tmp_path / 'in'
    folder.mkdir()
    for name in ('a.png', NOT_UTF8, LONG, os.path.join('sub_' + 'd' * 60, LONG)):
        os.makedirs(os.path.dirname(os.path.join(str(folder), name)), exist_ok=True)
        shutil.copy(GOOD, os.path.join(str(folder), name))
    (folder / 'huge.png').write_bytes(hostile.png_bytes(20000, 20000, 16, 6))
    (folder / 'huge.tif').write_bytes(hostile.tiff_header_bytes(70000, 70000))
    (folder / 'truncated.jpg').write_bytes(open(os.path.join(REPO, 'images', 'good_005.png'), 'rb').read()[:300])
    report, figures = tmp_path / 'r.json', tmp_path / 'figs'
    code, err = cli(['-f', fitted, '-i', str(folder), '-s', str(figures), '--json', str(report), '-th', '100'],
                    model_dir, capsys)
    assert code == 0, err
    assert 'Traceback' not in err
    assert re.search(r'skipping: refusing .*huge\.png: 20000x20000 is 400000000 pixels, above --max_pixels', err)
    assert 'huge.tif: 70000x70000' in err and 'truncated.jpg' in err
    text = report.read_bytes().decode('utf-8')  # strictly valid UTF-8
    assert '\\ud' not in text                   # no lone surrogates escaped into the JSON
    paths = [os.path.basename(i['path']) for i in json.loads(text)['images']]
    assert paths == ['a.png', 'caf\\xe9 \\xff.png', LONG, LONG]
    written = sorted(os.listdir(figures))
    assert len(written) == 4 and LONG in written and NOT_UTF8 in written, written
    shortened = [n for n in written if n.startswith('sub_ddd')]  # sub_ddd..._long_xxx.png: 314 bytes
    assert len(shortened) == 1 and re.search(r'~[0-9a-f]{10}\.png$', shortened[0]) and len(shortened[0]) <= 255
    assert all(cv2.imread(os.path.join(str(figures), n)) is not None for n in written if n.isascii())


def test_refused_single_input_is_one_line(tmp_path, fitted, model_dir, capsys):
    path = tmp_path / 'huge.bmp'
    path.write_bytes(hostile.bmp_header_bytes(40000, 40000))
    code, err = cli(['-f', fitted, '-i', str(path), '-s', str(tmp_path / 'fig.png'), '-th', '1'], model_dir, capsys)
    assert code == 1 and 'Traceback' not in err
    lines = error_lines(err)
    assert len(lines) == 1 and '40000x40000' in lines[0] and '--max_pixels' in lines[0], err
    assert os.listdir(tmp_path) == ['huge.bmp']


def test_lowered_pixel_limit_applies_to_inputs(tmp_path, fitted, model_dir, capsys):
    code, err = cli(['-f', fitted, '-i', GOOD, '--no_figures', '--max_pixels', '1000', '-th', '1'], model_dir, capsys)
    assert code == 1 and 'above --max_pixels 1000' in error_lines(err)[0]


@pytest.mark.parametrize('what', ['wrong-size precision', 'another method named', 'extra member', 'NaN threshold',
                                  'bit depth 13', 'consistent but foreign shapes'])
def test_tampered_feature_file_is_one_line(tmp_path, fitted, model_dir, capsys, what):
    arrays = hostile.members(open(fitted, 'rb').read())
    extra = []
    if what == 'wrong-size precision':
        key = next(k for k in arrays if k.startswith('image_precision'))
        arrays[key] = np.eye(3, dtype=np.float32)
    elif what == 'another method named':
        arrays = hostile.with_meta(arrays, method='spade')
    elif what == 'NaN threshold':
        arrays = hostile.with_meta(arrays, thresholds={'image': float('nan'), 'pixel': 1.0, 'source': 'x'})
    elif what == 'bit depth 13':
        arrays = hostile.with_meta(arrays, bit_depth=13)
    elif what == 'consistent but foreign shapes':  # arrays and params agree, the backbone does not
        params = json.loads(str(arrays['meta']))['method_params']
        channels = params['feature_shapes'][0][0] + 1
        params['feature_shapes'][0][0] = channels
        arrays = dict(hostile.with_meta(arrays, method_params=params), image_mean_0=np.zeros(channels, np.float32),
                      image_precision_0=np.eye(channels, dtype=np.float32))
    else:
        extra = [('junk.npy', b'\x00' * (1 << 20), 8)]
    feat = tmp_path / 'tampered.pkl'
    feat.write_bytes(hostile.archive_bytes(arrays, extra))
    code, err = cli(['-f', str(feat), '-i', GOOD, '--no_figures', '-th', '1'], model_dir, capsys)
    assert code == 1 and 'Traceback' not in err
    lines = error_lines(err)
    assert len(lines) == 1 and 'tampered.pkl: damaged feature file: ' in lines[0], err


def test_masks_with_alpha_give_the_same_thresholds(tmp_path, fitted, model_dir, capsys):
    """gt masks rewritten as editors write them (opaque RGBA) and as alpha layers: same thresholds."""
    test_dir = tmp_path / 'test'
    test_dir.mkdir()
    names = ['good_000.png', 'good_005.png', 'broken_large_000.png', 'contamination_000.png']
    for name in names:
        shutil.copy(os.path.join(REPO, 'images', name), test_dir / name)
    reports = {}
    for kind in ('gray', 'opaque_rgba', 'alpha_layer'):
        gt_dir = tmp_path / kind
        gt_dir.mkdir()
        for name in os.listdir(os.path.join(REPO, 'gt_masks')):
            mask = cv2.imread(os.path.join(REPO, 'gt_masks', name), cv2.IMREAD_GRAYSCALE)
            if os.path.splitext(name)[0].replace('_mask', '') + '.png' not in names:
                continue
            opaque = np.full_like(mask, 255)
            array = {'gray': mask, 'opaque_rgba': np.dstack([mask, mask, mask, opaque]),
                     'alpha_layer': np.dstack([np.zeros_like(mask)] * 3 + [mask])}[kind]
            assert cv2.imwrite(str(gt_dir / name), array)
        # a good image with an all-black opaque mask stays good
        black = cv2.imread(GOOD, cv2.IMREAD_GRAYSCALE) * 0
        assert cv2.imwrite(str(gt_dir / 'good_005.png'), np.dstack([black] * 3 + [np.full_like(black, 255)]))
        report = tmp_path / f'{kind}.json'
        code, err = cli(['-f', fitted, '-i', str(test_dir), '--test_dir', str(test_dir), '--gt_dir', str(gt_dir),
                         '--no_figures', '--json', str(report)], model_dir, capsys)
        assert code == 0, err
        reports[kind] = json.loads(report.read_text())
    for kind in ('opaque_rgba', 'alpha_layer'):
        assert reports[kind]['threshold'] == reports['gray']['threshold'], kind
        assert reports[kind]['pixel_threshold'] == reports['gray']['pixel_threshold'], kind


def test_outputs_follow_the_umask(tmp_path, fitted, model_dir, capsys):
    previous = os.umask(0o002)
    try:
        code, err = cli(['-f', fitted, '-i', GOOD, '-s', str(tmp_path / 'fig.png'), '--json', str(tmp_path / 'r.json'),
                         '-th', '100'], model_dir, capsys)
    finally:
        os.umask(previous)
    assert code == 0, err
    for name in ('fig.png', 'r.json'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o664, name


@pytest.mark.parametrize('flag, value', [('--seed', '-1'), ('--max_pixels', '-5'), ('--max_pixels', str(1 << 31)),
                                         ('--json', 'x' * 256 + '.json'), ('--savepath', 'y' * 300),
                                         ('--feat', '/'), ('--test_dir', '/no/such/folder'),
                                         ('--model_dir', 'README.md')])
def test_bad_flags_fail_when_parsed(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mahalanobisad.parse_args([flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err and 'argument' in err


def test_a_bad_flag_stops_the_command_before_any_work(tmp_path, small_train, model_dir):
    """--seed -1 used to be accepted, the fit ran for half a minute, then a traceback."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, 'mahalanobisad.py', '-tr', small_train, '-f', str(tmp_path / 'f.pkl'),
                             '--model_dir', model_dir, '--seed', '-1'], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == 'mahalanobisad.py: error: argument --seed: must be a non-negative integer, ' \
                                    'got -1 (see --help)'
    assert not os.path.exists(tmp_path / 'f.pkl') and time.perf_counter() - start < 60


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_output(tmp_path, small_train, model_dir):
    out = tmp_path / 'out'
    process = subprocess.Popen(
        [sys.executable, 'mahalanobisad.py', '-tr', small_train, '-f', str(out / 'feat.pkl'), '-i', 'images',
         '-s', str(out / 'figs'), '--json', str(out / 'r.json'), '--model_dir', model_dir, '-a', '-an', '3'],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:  # wait until the fit is under way
        seen.append(line)
        if 'fitting' in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    err = ''.join(seen) + rest
    assert process.returncode == 130, err
    assert 'Traceback' not in err
    lines = [line for line in re.split(r'[\r\n]', err) if line.strip()]
    assert lines[-1] == 'mahalanobisad.py: interrupted' and err.count('interrupted') == 1, err
    leftovers = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files]
    assert leftovers == [], leftovers  # no feature file, no figure, no JSON, no temporary file


def twelve_bit_copy(source, target):
    assert cv2.imwrite(target, hostile.twelve_bit(cv2.imread(source, cv2.IMREAD_UNCHANGED)))


def test_twelve_bit_camera_scores_like_eight_bit(tmp_path, small_train, model_dir, capsys, caplog):
    """Training and test images from a 12-bit camera (0..4095 in 16-bit PNGs): the bit depth is learnt,
    kept in the feature file, and the scores equal those of the same pictures in 8 bits."""
    caplog.set_level('INFO')
    train12, test = tmp_path / 'train12', tmp_path / 'test'
    train12.mkdir(), test.mkdir()
    for name in sorted(os.listdir(small_train))[:6]:
        twelve_bit_copy(os.path.join(small_train, name), str(train12 / name))
    for name in ('good_000.png', 'broken_large_000.png'):
        shutil.copy(os.path.join(REPO, 'images', name), test / ('a8_' + name))
        twelve_bit_copy(os.path.join(REPO, 'images', name), str(test / ('b12_' + name)))
    bright = (cv2.imread(GOOD).astype(np.uint16) * 64)  # up to 16320: beyond 12 bits
    assert cv2.imwrite(str(test / 'c_bright.png'), bright)
    feat12, report = str(tmp_path / 'f12.pkl'), tmp_path / 'r.json'
    code, err = cli(['-tr', str(train12), '-f', feat12, '-i', str(test), '--no_figures', '-th', '1e9',
                     '--json', str(report)], model_dir, capsys)
    assert code == 0, err
    assert json.loads(str(np.load(feat12)['meta']))['bit_depth'] == 12
    assert 'training images hold 12-bit data in 16-bit files' in caplog.text
    assert 'c_bright.png has values up to 16320, above the 12-bit range (0..4095)' in caplog.text
    scores = {os.path.basename(i['path']): i['score'] for i in json.loads(report.read_text())['images']}
    for name in ('good_000.png', 'broken_large_000.png'):
        assert scores['b12_' + name] == pytest.approx(scores['a8_' + name], rel=1e-3), name
