"""score_archive.py: a Dask LocalCluster scores like the CLI, resumes, survives a killed worker, reads manifests
and records unreadable images."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from distributed import Client, LocalCluster

import image_utils
import mahalanobisad
import score_archive
from detector import Detector
from tests.conftest import REPO

SAMPLE = sorted(os.path.join('images', f) for f in os.listdir(os.path.join(REPO, 'images')) if f.endswith('.png'))


@pytest.fixture(scope='module')
def feat(tmp_path_factory, small_train, model_dir):
    """A feature file fitted on 12 sample images."""
    path = str(tmp_path_factory.mktemp('feat') / 'small.pkl')
    Detector(model_dir=model_dir).fit(image_utils.list_images(small_train)).save(path)
    return path


@pytest.fixture(scope='module')
def cli_scores(tmp_path_factory, feat, model_dir):
    """{path: score} of the sample images as mahalanobisad.py reports them."""
    report = str(tmp_path_factory.mktemp('cli') / 'cli.json')
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert mahalanobisad.run(['-f', feat, '-i', 'images', '-th', '0', '--no_figures', '--json', report,
                                  '--model_dir', model_dir]) == 0
    with open(report) as f:
        return {image['path']: image['score'] for image in json.load(f)['images']}


@pytest.fixture(scope='module')
def client():
    """Two single-threaded worker processes, shared by the in-process tests below."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host='127.0.0.1',
                      dashboard_address='127.0.0.1:0', scheduler_kwargs={'dashboard': False},
                      silence_logs=40) as cluster, Client(cluster) as client:
        yield client


def archive(client, feat, model_dir, input, output, *flags):
    client.wait_for_workers(2)
    return score_archive.main(['--feat', feat, '--input', str(input), '--output', str(output), '--model_dir',
                               model_dir, '--scheduler', client.scheduler.address, *flags])


def read_parts(output):
    """{part file name: [records]} of an output directory."""
    parts = {}
    for name in sorted(os.listdir(output)):
        if name.startswith('part-'):
            with open(os.path.join(output, name)) as f:
                parts[name] = [json.loads(line) for line in f]
    return parts


def test_local_cluster_matches_cli_as_a_user_runs_it(tmp_path, feat, model_dir, cli_scores):
    output = tmp_path / 'scores'
    result = subprocess.run(
        [sys.executable, 'score_archive.py', '--feat', feat, '--input', 'images', '--output', str(output),
         '--scheduler', 'local:2', '--shard_size', '5', '--model_dir', model_dir],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    parts = read_parts(output)
    assert list(parts) == [f'part-00000{i}.jsonl' for i in range(4)]
    assert [len(records) for records in parts.values()] == [5, 5, 5, 1]
    records = [r for records in parts.values() for r in records]
    assert [r['path'] for r in records] == SAMPLE
    assert {r['path']: r['score'] for r in records} == cli_scores  # exactly the same numbers
    summary = json.loads((output / '_SUMMARY.json').read_text())
    assert [r['anomaly'] for r in records] == [r['score'] >= summary['threshold'] for r in records]
    assert summary['images'] == summary['images_scored'] == 16 and summary['failures'] == 0
    assert summary['anomalies'] == sum(r['anomaly'] for r in records) > 0
    assert summary['shards'] == 4 and summary['images_per_s'] > 0


def test_manifest_with_unreadable_images_then_resume(tmp_path, monkeypatch, client, feat, model_dir, cli_scores):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)
    lines = [os.path.join(REPO, SAMPLE[0]), 'corrupt.png', os.path.join(REPO, SAMPLE[1]), 'missing.png',
             os.path.join(REPO, SAMPLE[-1])]
    (tmp_path / 'manifest.txt').write_text('\n'.join(lines[:3]) + '\n\n' + '\n'.join(lines[3:]) + '\n')

    summary = archive(client, feat, model_dir, 'manifest.txt', 'out', '--shard_size', '2')
    records = [r for records in read_parts('out').values() for r in records]
    assert [r['path'] for r in records] == lines  # the manifest's lines, blank ones skipped
    errors = {r['path']: r['error'] for r in records if 'error' in r}
    assert set(errors) == {'corrupt.png', 'missing.png'} and 'corrupt.png' in errors['corrupt.png']
    assert all(r['score'] is None and r['anomaly'] is None for r in records if 'error' in r)
    for r in records:
        if 'error' not in r:
            assert r['score'] == cli_scores[os.path.relpath(r['path'], REPO)]
    assert (summary['images'], summary['failures'], summary['shards']) == (5, 2, 3)

    before = {name: os.stat(os.path.join('out', name)).st_mtime_ns for name in read_parts('out')}
    resumed = archive(client, feat, model_dir, 'manifest.txt', 'out', '--shard_size', '2', '--resume')
    assert resumed['images_scored'] == 0 and resumed['shards_resumed'] == 3  # no work done
    assert {name: os.stat(os.path.join('out', name)).st_mtime_ns for name in read_parts('out')} == before
    assert {k: resumed[k] for k in ('images', 'anomalies', 'failures')} == \
        {k: summary[k] for k in ('images', 'anomalies', 'failures')}

    def threads():  # of the detector each worker loaded for its shards
        return [(os.environ[image_utils.THREADS_ENV], d.extractor.session.get_session_options().intra_op_num_threads)
                for d in score_archive._detectors.values()]
    loaded = [t for per_worker in client.run(threads).values() for t in per_worker]
    assert loaded and set(loaded) == {('1', 1)}  # one thread on each single-threaded worker


def test_refuses_to_mix_runs_in_one_output(tmp_path, monkeypatch, client, feat, model_dir, capsys):
    monkeypatch.chdir(REPO)
    output = str(tmp_path / 'out')
    archive(client, feat, model_dir, 'images', output, '--shard_size', '8')
    common = ['--feat', feat, '--input', 'images', '--output', output, '--model_dir', model_dir,
              '--scheduler', client.scheduler.address]
    assert score_archive.run(common + ['--shard_size', '8']) == 1
    assert 'pass --resume' in capsys.readouterr().err
    assert score_archive.run(common + ['--shard_size', '4', '--resume']) == 1
    assert 'shard_size 8 now 4' in capsys.readouterr().err


@pytest.mark.parametrize('flags, message', [
    (['--input', 'no_such_dir'], 'no such file or directory: no_such_dir'),
    (['--input', SAMPLE[0]], 'is an image: give a directory or a manifest'),
    (['--input', 'images', '--scheduler', 'local:0'], 'local:N needs a positive number of workers'),
    (['--input', 'images', '--scheduler', 'head:8786'], 'expected local:N or a scheduler address'),
])
def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, feat, model_dir, capsys, flags, message):
    monkeypatch.chdir(REPO)
    try:
        code = score_archive.run(['--feat', feat, '--output', str(tmp_path / 'out'), '--model_dir', model_dir] + flags)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists() or not read_parts(tmp_path / 'out')


def test_killed_worker_loses_and_duplicates_nothing(tmp_path, monkeypatch, client, feat, model_dir, cli_scores):
    monkeypatch.chdir(REPO)
    lines = SAMPLE * 6
    (tmp_path / 'manifest.txt').write_text('\n'.join(lines) + '\n')
    output = tmp_path / 'out'
    client.wait_for_workers(2)
    pids = client.run(os.getpid)
    outcome = {}

    def score():
        try:
            outcome['summary'] = archive(client, feat, model_dir, tmp_path / 'manifest.txt', output,
                                         '--shard_size', '4')
        except BaseException as e:  # reported by the assertion below
            outcome['error'] = e
    job = threading.Thread(target=score)
    job.start()
    deadline = time.monotonic() + 60
    while not (output.exists() and read_parts(output)) and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = [address for address, keys in client.processing().items() if keys]
    parts_at_kill = len(read_parts(output))
    os.kill(pids[busy[0]], signal.SIGKILL)  # a worker with shards assigned, mid-job
    job.join(120)

    assert 'error' not in outcome, outcome.get('error')
    assert parts_at_kill < len(lines) // 4
    assert pids[busy[0]] not in client.run(os.getpid).values()
    parts = read_parts(output)
    assert list(parts) == [f'part-{i:06d}.jsonl' for i in range(len(lines) // 4)]
    records = [r for records in parts.values() for r in records]
    assert [r['path'] for r in records] == lines  # nothing lost, nothing twice, in order
    assert all(r['score'] == cli_scores[r['path']] for r in records)
    assert outcome['summary']['images'] == len(lines)
    assert not [f for f in os.listdir(output) if f.endswith('.tmp')]
