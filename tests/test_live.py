"""Live inspection (live.py): video files, image sequences, cameras, watched folders; stored thresholds;
-b, --env_list, -e. Videos are built here with cv2.VideoWriter from the sample images."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import onnxruntime
import pytest

from thresholds import labelled_set_fingerprint
import live
import mahalanobisad
import plot_utils
from detector import Detector
from tests.conftest import REPO

SAMPLE = sorted(os.path.join(REPO, 'images', f) for f in os.listdir(os.path.join(REPO, 'images'))
                if f.endswith('.png'))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope='module')
def feat(tmp_path_factory, small_train, model_dir):
    """A feature file fitted on 12 sample images, its thresholds calibrated on images/ + gt_masks/."""
    path = str(tmp_path_factory.mktemp('feat') / 'small.pkl')
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert mahalanobisad.run(['-tr', small_train, '-f', path, '-i', SAMPLE[0], '--no_figures',
                                  '--model_dir', model_dir]) == 0
    return path


def cli(args, feat, model_dir):
    return mahalanobisad.run(['-f', feat, '--model_dir', model_dir] + args)


def write_video(path, images, fps, size=None):
    """A video of `images` (BGR) at `fps`; each resized to `size` (w, h) if given."""
    size = size or images[0].shape[1::-1]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, size)
    assert writer.isOpened()
    for image in images:
        writer.write(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    writer.release()


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_video_file_gives_one_json_line_and_one_annotated_frame_per_frame(tmp_path, feat, model_dir):
    clip, out, report = tmp_path / 'line.mp4', tmp_path / 'inspected.mp4', tmp_path / 'frames.jsonl'
    write_video(clip, [cv2.imread(p) for p in SAMPLE[:6]], fps=5, size=(256, 256))
    assert cli(['-v', str(clip), '-s', str(out), '--json', str(report)], feat, model_dir) == 0

    lines = read_lines(report)
    frames, summary = lines[:-1], lines[-1]['summary']
    assert [f['frame'] for f in frames] == list(range(6))
    assert [f['time_s'] for f in frames] == [i / 5 for i in range(6)]
    assert all(f['anomaly'] == (f['score'] >= summary['threshold']) for f in frames)
    assert summary['frames_scored'] == 6 and summary['frames_skipped'] == 0 and summary['fps'] > 0
    assert summary['anomalous'] == sum(f['anomaly'] for f in frames) and not summary['interrupted']
    assert summary['threshold_source'] == 'stored: F1-optimal on images + gt_masks'

    video = cv2.VideoCapture(str(out))
    assert video.get(cv2.CAP_PROP_FPS) == 5
    shown = []
    while (frame := video.read())[0]:
        shown.append(frame[1])
    assert len(shown) == 6 and shown[0].shape[1::-1] == plot_utils.LIVE_SIZE
    banner = [tuple(int(c) for c in f[5, 5]) for f in shown]  # the verdict's colour, top left
    assert [max(b) == b[2] for b in banner] == [f['anomaly'] for f in frames]  # red = anomaly, green = OK
    assert set(os.listdir(tmp_path)) == {'line.mp4', 'inspected.mp4', 'frames.jsonl'}  # no partial file left


def test_frames_of_a_lossless_sequence_score_as_the_images(tmp_path, feat, model_dir):
    """An image sequence is lossless: its frames' scores equal the scores of the same files as images."""
    frames = tmp_path / 'frames'
    frames.mkdir()
    paths = []
    for i, source in enumerate(SAMPLE[::4]):
        paths.append(str(frames / f'{i:04d}.png'))
        shutil.copy(source, paths[-1])
    report = tmp_path / 'frames.jsonl'
    assert cli(['-v', str(frames / '%04d.png'), '--no_figures', '--json', str(report)], feat, model_dir) == 0
    scores = [line['score'] for line in read_lines(report)[:-1]]
    expected = Detector.load(feat, model_dir=model_dir).decision_function(paths)
    assert len(scores) == len(paths)
    np.testing.assert_array_equal(scores, expected)


def test_realtime_never_falls_behind(tmp_path, feat, model_dir):
    """The newest frame each time: a consumer slower than the source skips frames and counts them."""
    clip = tmp_path / 'fast.mp4'
    write_video(clip, [cv2.imread(SAMPLE[i % len(SAMPLE)]) for i in range(30)], fps=1000, size=(64, 64))
    source = live.VideoSource(str(clip))
    newest = live.NewestFrames(source)
    taken = []
    for frame in newest:
        taken.append(frame.index)
        time.sleep(0.01)  # 10 source frames per frame taken
    newest.close()
    source.release()
    assert taken == sorted(taken) and taken[0] == 0
    assert newest.skipped > 0 and len(taken) + newest.skipped == 30

    report = tmp_path / 'rt.jsonl'
    assert cli(['-v', str(clip), '--realtime', '--no_figures', '--json', str(report)], feat, model_dir) == 0
    lines = read_lines(report)
    summary = lines[-1]['summary']
    assert summary['frames_scored'] + summary['frames_skipped'] == 30
    assert summary['frames_skipped'] > 0  # scoring a frame takes far longer than the 1 ms between frames
    assert all(line['latency_s'] > 0 for line in lines[:-1])
    assert summary['latency_s']['median'] > 0


def test_sources_that_cannot_be_opened_are_one_line_errors(tmp_path, feat, model_dir, capsys):
    not_video = tmp_path / 'notes.mp4'
    not_video.write_text('not a video')
    for source, message in ((str(not_video), f'cannot read {not_video}: not a video'),
                            (str(tmp_path / 'missing.mp4'), 'no such video file'),
                            ('57', 'cannot open camera 57')):
        assert cli(['-v', source], feat, model_dir) == 1
        err = capsys.readouterr().err
        assert f'mahalanobisad.py: error: {message}' in err and 'Traceback' not in err
    # As a user sees it: FFmpeg's own complaint does not add lines to the one-line error.
    result = subprocess.run([sys.executable, 'mahalanobisad.py', '-f', feat, '--model_dir', model_dir,
                             '-v', str(not_video)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith('mahalanobisad.py: error: cannot read')
    assert 'moov' not in result.stderr and 'Traceback' not in result.stderr


def test_a_file_still_being_written_is_not_complete(tmp_path):
    data = open(SAMPLE[0], 'rb').read()
    files = live.CompletedFiles(str(tmp_path), settle_s=0.05)
    with open(tmp_path / 'part.png', 'wb') as f:
        f.write(data[:1000])
        f.flush()
        time.sleep(0.2)
        assert files.poll() == [] and files.poll() == []  # unchanged for longer than settle_s, but open
        f.write(data[1000:])
    time.sleep(0.1)
    assert files.poll() == [str(tmp_path / 'part.png')]
    assert files.poll() == []  # reported once


def test_watch_mode_scores_each_completed_file_once_and_stops_on_sigint(tmp_path, feat, model_dir):
    incoming, figures, report = tmp_path / 'incoming', tmp_path / 'figures', tmp_path / 'results.jsonl'
    (incoming / 'sub').mkdir(parents=True)
    shutil.copy(SAMPLE[0], incoming / 'a.png')
    shutil.copy(SAMPLE[-1], incoming / 'sub' / 'b.png')
    process = subprocess.Popen([sys.executable, 'mahalanobisad.py', '-f', feat, '--model_dir', model_dir,
                                '--watch', str(incoming), '--json', str(report), '-s', str(figures)],
                               stderr=subprocess.PIPE, text=True)

    def wait_for_lines(n, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if report.exists() and len(read_lines(report)) >= n:
                return read_lines(report)
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        raise AssertionError(f'no {n} JSON lines in {timeout} s')

    try:
        assert {line['path'] for line in wait_for_lines(2)} == {str(incoming / 'a.png'),
                                                                str(incoming / 'sub' / 'b.png')}
        shutil.copy(SAMPLE[5], incoming / 'copied.png')
        data = open(SAMPLE[5], 'rb').read()
        with open(incoming / 'halves.png', 'wb') as f:  # a slow writer: half, a pause, the rest
            f.write(data[:len(data) // 2])
            f.flush()
            time.sleep(1.0)
            f.write(data[len(data) // 2:])
        (incoming / 'broken.png').write_bytes(b'not an image')
        lines = wait_for_lines(4)
        time.sleep(1.0)  # time for a wrong extra line (a half-written or repeated file) to appear
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    lines = read_lines(report)
    files, summary = lines[:-1], lines[-1]['summary']
    scores = {os.path.basename(line['path']): line['score'] for line in files}
    assert sorted(scores) == ['a.png', 'b.png', 'copied.png', 'halves.png']  # each once, broken.png skipped
    assert scores['halves.png'] == scores['copied.png']  # scored whole
    assert summary['files_scored'] == 4 and summary['unreadable'] == 1 and summary['interrupted']
    assert 'cannot decode' in err and 'ended: 4 files scored' in err and 'Traceback' not in err
    assert sorted(os.listdir(figures)) == ['a.png', 'copied.png', 'halves.png', 'sub_b.png']


def copy_labelled(tmp_path, names):
    test_dir, gt_dir = tmp_path / 'labelled', tmp_path / 'masks'
    test_dir.mkdir()
    gt_dir.mkdir()
    for name in names:
        shutil.copy(os.path.join(REPO, 'images', name), test_dir / name)
        mask = os.path.join(REPO, 'gt_masks', name.replace('.png', '_mask.png'))
        if os.path.exists(mask):
            shutil.copy(mask, gt_dir)
    return str(test_dir), str(gt_dir)


def test_stored_thresholds_are_reused_until_the_labelled_set_changes(tmp_path, feat, model_dir, monkeypatch, caplog):
    caplog.set_level('INFO')
    my_feat, report = str(tmp_path / 'feat.pkl'), str(tmp_path / 'r.json')
    shutil.copy(feat, my_feat)
    test_dir, gt_dir = copy_labelled(tmp_path, ['good_000.png', 'good_005.png', 'broken_large_000.png',
                                                'contamination_000.png'])
    scored = []
    inspect = Detector.inspect
    monkeypatch.setattr(Detector, 'inspect', lambda self, images, *a, **k: (scored.append(len(images)),
                                                                            inspect(self, images, *a, **k))[1])

    def run(*extra):
        scored.clear()
        caplog.clear()
        assert cli(['-i', SAMPLE[0], '--test_dir', test_dir, '--gt_dir', gt_dir, '--no_figures', '--json', report,
                    *extra], my_feat, model_dir) == 0
        with open(report) as f:
            return json.load(f)

    source = f'F1-optimal on {test_dir} + {gt_dir}'
    first = run()
    assert first['threshold_source'] == source and scored == [4, 1]
    assert 'stored the thresholds in' in caplog.text
    again = run()
    assert again['threshold_source'] == 'stored: ' + source and scored == [1]  # only the input
    assert again['threshold'] == first['threshold'] and 'labelled images not scored' in caplog.text

    os.utime(os.path.join(test_dir, 'good_005.png'))  # touched: maybe replaced
    assert run()['threshold_source'] == source and scored == [4, 1]
    assert 'the labelled set changed' in caplog.text
    assert run('--recalibrate')['threshold_source'] == source and scored == [4, 1]
    assert '--recalibrate' in caplog.text

    # A threshold chosen by hand for this set (what the web console saves) is honoured the same way.
    chosen = Detector.load(my_feat, model_dir=model_dir)
    chosen.set_threshold(123.0, 'web console').save(my_feat)
    by_hand = run()
    assert (by_hand['threshold'], by_hand['threshold_source'], scored) == (123.0, 'stored: web console', [1])
    stored = json.loads(str(np.load(my_feat)['meta']))['thresholds']
    assert stored['source'] == 'web console' and stored['labelled']['n_images'] == 4

    shutil.copy(os.path.join(REPO, 'images', 'good_010.png'), test_dir)  # a new labelled image
    assert run()['threshold_source'] == source and scored == [5, 1]

    # Without labelled images (another directory, say on the line's computer) the stored ones hold.
    monkeypatch.chdir(tmp_path)
    assert cli(['-i', SAMPLE[0], '--no_figures', '--json', report], my_feat, model_dir) == 0
    with open(report) as f:
        assert json.load(f)['threshold_source'] == 'stored: ' + source


def test_fingerprint_follows_files_and_settings(tmp_path):
    a, b = tmp_path / 'a.png', tmp_path / 'b.png'
    shutil.copy(SAMPLE[0], a)
    shutil.copy(SAMPLE[1], b)
    base = labelled_set_fingerprint([str(a), str(b)], [None, None], rule='x')
    assert base == labelled_set_fingerprint([str(a), str(b)], None, rule='x')
    assert base != labelled_set_fingerprint([str(a)], None, rule='x')
    assert base != labelled_set_fingerprint([str(a), str(b)], None, rule='y')
    os.utime(b, ns=(0, 0))
    assert base['files'] != labelled_set_fingerprint([str(a), str(b)], None, rule='x')['files']


def test_benchmark_env_list_and_env_id(feat, model_dir, capsys):
    assert cli(['-i', SAMPLE[0], SAMPLE[1], '-b', '-bc', '2'], feat, model_dir) == 0
    table = capsys.readouterr().out
    for stage in ('decode', 'backbone', 'scoring', 'figure', 'end to end'):
        assert stage in table
    assert '(2 images, 2 runs)' in table

    assert mahalanobisad.run(['--env_list']) == 0
    providers = onnxruntime.get_available_providers()
    listed = capsys.readouterr().out
    assert f'{providers.index("CPUExecutionProvider")}: CPUExecutionProvider' in listed
    cpu = str(providers.index('CPUExecutionProvider'))
    assert cli(['-e', cpu, '-i', SAMPLE[0], '--no_figures'], feat, model_dir) == 0
    assert cli(['-e', str(len(providers)), '-i', SAMPLE[0]], feat, model_dir) == 1
    assert f'no execution provider {len(providers)}' in capsys.readouterr().err
    for flags in (['-v', 'x.mp4', '--watch', 'y'], ['--realtime'], ['--watch', 'y', '-b']):
        with pytest.raises(SystemExit) as stop:
            mahalanobisad.run(flags)
        assert stop.value.code == 2
