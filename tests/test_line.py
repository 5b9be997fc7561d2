"""Talking to the line: the outbox (outbox.py), MQTT and webhooks (publish.py) with real parts — Debian's
Mosquitto broker (installed by .ci/run) started here on a loopback port, killed and restarted mid-run, and an
HTTP receiver on loopback —, the imaging conditions (conditions.py), the metrics (metrics.py) and the
console's token and /metrics (web_app.py)."""
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

import conditions
import feature_file
import image_utils
import mahalanobisad
import metrics
import publish
import web_app
from detector import Detector
from errors import FeatureFileError, OutboxError, UsageError
from outbox import Outbox
from thresholds import conformal_threshold
from tests.conftest import REPO
from tests.line_parts import Broker, Receiver, Subscriber, free_port, tls_listener, wait_for

FAST_RETRY = (0.05, 0.2)
SAMPLE = os.path.join(REPO, 'images', 'broken_large_000.png')


@pytest.fixture
def broker(tmp_path):
    running = Broker(str(tmp_path)).start()
    yield running
    running.stop()


@pytest.fixture
def receiver():
    running = Receiver()
    yield running
    running.close()


def verdicts(n, source='test'):
    return [publish.message('verdict', source, n=i) for i in range(n)]


@pytest.fixture(scope='module')
def line_feat(tmp_path_factory, small_train, model_dir):
    """A feature file fitted on the 12 sample training images (its conditions range included)."""
    path = str(tmp_path_factory.mktemp('line_feat') / 'line3.pkl')
    Detector(model_dir=model_dir).fit(image_utils.list_images(small_train), source=small_train).save(path)
    return path


def darkened(path, factor=0.6):
    image = cv2.imread(path)
    return np.clip(np.round(image * factor), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# publish URLs
# ----------------------------------------------------------------------------------------------

def test_publish_urls_and_credentials_never_shown(monkeypatch, capsys, tmp_path):
    d = publish.parse_destination('mqtt://user:s%40cret@broker.local/line3/verdicts?client_id=line3-cam1')
    assert (d.host, d.port, d.topic, d.client_id, d.username, d.password) == (
        'broker.local', 1883, 'line3/verdicts', 'line3-cam1', 'user', 's@cret')
    assert d.shown == 'mqtt://broker.local:1883/line3/verdicts' and 'cret' not in repr(d)
    assert publish.parse_destination('mqtts://b/t').port == 8883
    monkeypatch.setenv(publish.MQTT_USERNAME_ENV, 'env-user')
    monkeypatch.setenv(publish.MQTT_PASSWORD_ENV, 'env-pass')
    monkeypatch.setenv(publish.WEBHOOK_TOKEN_ENV, 'env-token')
    d = publish.parse_destination('mqtt://b:1884/t')
    assert (d.port, d.username, d.password) == (1884, 'env-user', 'env-pass') and d.client_id.startswith('mahalan')
    hook = publish.parse_destination('https://me:pw@mes.local/hooks/inspection?key=abc')
    assert hook.url == 'https://mes.local:443/hooks/inspection?key=abc'  # credentials go as auth, not in the URL
    assert (hook.username, hook.password, hook.token) == ('me', 'pw', 'env-token')
    assert hook.shown == 'https://mes.local:443/hooks/inspection'  # no query: it may hold a key
    for bad, why in (('ftp://u:pw@x/y', 'cannot be published to'), ('mqtt://u:pw@broker', 'MQTT topic'),
                     ('mqtt://u:pw@broker/line/#', 'no "#"'), ('mqtt://u:pw@b/line/+/v', 'wildcards'),
                     ('mqtt://u:pw@b:99999/t', 'not a valid'), ('http://u:pw@/x', 'without a host'),
                     ('mqtt://u:pw@b/t?qos=2', 'client_id'), ('mqtt://b/t x', 'no spaces'), ('', 'no spaces')):
        with pytest.raises(UsageError, match=why) as e:
            publish.parse_destination(bad)
        assert 'pw' not in str(e.value)
    with pytest.raises(SystemExit) as stop:  # the command line: one line, exit code 2, no password
        mahalanobisad.run(['--watch', str(tmp_path), '--publish', 'mqtt://user:hunter2@broker/line3/#'])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1 and 'hunter2' not in err and 'no "#"' in err
    for flags in (['-i', SAMPLE, '--publish', 'mqtt://b/t'], ['--watch', str(tmp_path), '--outbox', 'x.outbox']):
        with pytest.raises(SystemExit) as stop:
            mahalanobisad.run(flags)
        assert stop.value.code == 2


# ----------------------------------------------------------------------------------------------
# the outbox
# ----------------------------------------------------------------------------------------------

def digest(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def test_outbox_keeps_order_across_runs_and_refuses_files_not_its_own(tmp_path, caplog):
    path = str(tmp_path / 'line3.outbox')
    box = Outbox(path, ['a', 'b'])
    for i in range(3):
        assert box.put(f'id{i}', f'{{"n": {i}}}')
    box.remove([seq for seq, _, _ in box.pending('a')][:1])
    with pytest.raises(OutboxError, match='in use by another process'):
        Outbox(path, ['a'])
    box.close()
    again = Outbox(path, ['a'])  # the next run: what was not acknowledged, in order, first
    assert [m for _, m, _ in again.pending('a')] == ['id1', 'id2'] and again.depth() == {'a': 2, 'b': 3}
    assert 'holds 3 messages for b, which this run does not publish to' in caplog.text
    again.put('id3', '{}')
    assert [m for _, m, _ in again.pending('a')] == ['id1', 'id2', 'id3']
    again.close()

    garbage, empty, foreign, damaged = (str(tmp_path / n) for n in ('garbage', 'empty', 'foreign', 'damaged'))
    with open(garbage, 'wb') as f:
        f.write(b'{"path": "a.png"}\n' * 100)
    open(empty, 'wb').close()
    with sqlite3.connect(foreign) as db:
        db.execute('CREATE TABLE parts (id)')
    shutil.copy(path, damaged)
    with open(damaged, 'r+b') as f:  # page 2 (the table's first) overwritten
        f.seek(4096)
        f.write(b'\xff' * 4096)
    cases = {garbage: 'not an outbox of this tool', empty: 'not an outbox of this tool',
             foreign: 'SQLite database of another program', damaged: 'is damaged', str(tmp_path): 'is not a file'}
    for bad, why in cases.items():
        before = None if os.path.isdir(bad) else digest(bad)
        with pytest.raises(OutboxError, match=why) as e:
            Outbox(bad, ['a'])
        assert '\n' not in str(e.value) and 'left as it is' in str(e.value)
        assert before is None or digest(bad) == before  # never deleted, never written
    assert sorted(os.listdir(tmp_path)) == ['damaged', 'empty', 'foreign', 'garbage', 'line3.outbox']


DISK_FULL_CHILD = """
import logging, resource, signal, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.WARNING, format='%(message)s')
from outbox import Outbox
from thresholds import conformal_threshold
box = Outbox(sys.argv[2], ['a'])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails (EFBIG) like on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
stored = sum(box.put(str(i), 'x' * 500) for i in range(200))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(stored, box.lost, box.put('after', '{}'), box.depth()['a'])
"""


def test_full_disk_and_full_outbox_drop_new_messages_and_the_inspection_goes_on(tmp_path, line_feat, model_dir,
                                                                                 caplog):
    # A real write failure: the file-size limit makes the disk "full" for this process only.
    child = subprocess.run([sys.executable, '-c', DISK_FULL_CHILD, REPO, str(tmp_path / 'disk.outbox')],
                           capture_output=True, text=True, timeout=60)
    stored, lost, after, depth = child.stdout.split()
    assert int(stored) + int(lost) == 200 and int(lost) > 0 and after == 'True' and int(depth) == int(stored) + 1
    assert 'cannot store a message (disk I/O error): dropped, the inspection goes on' in child.stderr
    assert 'stores messages again' in child.stderr and 'Traceback' not in child.stderr

    # A full outbox (max_mb) with its receiver down: every image is still scored; the loss is counted.
    detector = Detector.load(line_feat, model_dir=model_dir)
    line_metrics = metrics.Metrics(lambda: detector.threshold_)
    publisher = publish.Publisher([f'http://127.0.0.1:{free_port()}/down'], str(tmp_path / 'small.outbox'),
                                  max_mb=0.02, retry_s=FAST_RETRY, metrics=line_metrics)
    images = [SAMPLE] * 40
    with publish.LineReport(detector, 'test', publisher, line_metrics) as report:
        for result in detector.inspect(images):
            report.scored(result, path=result.path)
    exposed = line_metrics.exposition().decode()
    lost = publisher.outbox.lost
    assert 0 < lost < len(images) and f'mahalanobisad_messages_lost_total {float(lost)}' in exposed
    assert f'mahalanobisad_images_total {float(len(images))}' in exposed
    assert 'database or disk is full' in caplog.text and 'stay in the outbox' in caplog.text


# ----------------------------------------------------------------------------------------------
# MQTT and webhooks
# ----------------------------------------------------------------------------------------------

def test_broker_killed_and_restarted_mid_run_every_message_arrives(tmp_path, broker, caplog):
    subscriber = Subscriber(broker.port)
    caplog.set_level('INFO')
    sent = verdicts(60)
    url = f'mqtt://127.0.0.1:{broker.port}/line3/verdicts'
    line_metrics = metrics.Metrics(lambda: 1.0)
    try:
        with publish.Publisher([url], str(tmp_path / 'line3.outbox'), retry_s=FAST_RETRY,
                               metrics=line_metrics) as publisher:
            for i, message in enumerate(sent):
                assert publisher.publish(message)  # never waits for the broker
                time.sleep(0.01)
                if i == 20:
                    broker.stop()
                if i == 40:
                    assert publisher.waiting() >= 19  # held in the outbox while the broker is down
                    broker.start()
            try:
                wait_for(lambda: len(set(subscriber.ids())) == len(sent), 30, 'every message')
            except AssertionError:
                missing = [i for i, m in enumerate(sent) if m['id'] not in set(subscriber.ids())]
                raise AssertionError(f'missing {missing}, waiting {publisher.waiting()}, got {len(subscriber.ids())}')
            wait_for(lambda: publisher.waiting() == 0, 10, 'the outbox to drain')
    finally:
        subscriber.close()
    assert set(subscriber.ids()) == {m['id'] for m in sent}  # none lost; a duplicate or two are allowed
    shown = publisher.destinations[0].shown
    assert f'mahalanobisad_messages_sent_total{{destination="{shown}"}} 60.0' in line_metrics.exposition().decode()
    assert 'connection lost' in caplog.text and 'connected again' in caplog.text


def test_mqtts_with_credentials_from_the_environment_and_a_refused_password(tmp_path, monkeypatch, caplog):
    lines, certificate = tls_listener(str(tmp_path), 'line3', 's3cret')
    broker = Broker(str(tmp_path), tls_listener=lines).start()
    subscriber = Subscriber(broker.port)  # on the plain listener: it sees what came in over TLS
    monkeypatch.setenv(publish.MQTT_CA_ENV, certificate)
    url = f'mqtts://127.0.0.1:{broker.tls_port}/line3/verdicts'
    try:
        monkeypatch.setenv(publish.MQTT_USERNAME_ENV, 'line3')
        monkeypatch.setenv(publish.MQTT_PASSWORD_ENV, 'wr0ngpass')
        with publish.Publisher([url], str(tmp_path / 'refused.outbox'), retry_s=FAST_RETRY) as publisher:
            publisher.publish(verdicts(1)[0])
            wait_for(lambda: 'refused the connection' in caplog.text, 10, 'the refusal')
            assert publisher.waiting() == 1  # kept
        monkeypatch.setenv(publish.MQTT_PASSWORD_ENV, 's3cret')
        sent = verdicts(3)
        with publish.Publisher([url], str(tmp_path / 'tls.outbox'), retry_s=FAST_RETRY) as publisher:
            for message in sent:
                publisher.publish(message)
            wait_for(lambda: publisher.waiting() == 0, 10, 'the outbox to drain')
        wait_for(lambda: len(subscriber.messages) == 3, 10, 'the messages')
    finally:
        subscriber.close()
        broker.stop()
    assert subscriber.ids() == [m['id'] for m in sent]
    assert 's3cret' not in caplog.text and 'wr0ngpass' not in caplog.text


def test_webhook_500_three_times_then_200_and_an_unfixable_4xx_is_dropped(tmp_path, caplog, monkeypatch):
    caplog.set_level('INFO')
    monkeypatch.setenv(publish.WEBHOOK_TOKEN_ENV, 'line3-token')
    receiver = Receiver([500, 500, 500, 200, lambda body: 422 if body['n'] == 1 else 200])
    sent = verdicts(4)
    try:
        line_metrics = metrics.Metrics(lambda: 1.0)
        with publish.Publisher([receiver.url], str(tmp_path / 'hook.outbox'), retry_s=FAST_RETRY,
                               metrics=line_metrics) as publisher:
            for message in sent:
                publisher.publish(message)
            wait_for(lambda: publisher.waiting() == 0, 20, 'the outbox to drain')
    finally:
        receiver.close()
    assert [status for status, _, _ in receiver.requests] == [500, 500, 500, 200, 422, 200, 200]
    assert [body['n'] for body in receiver.accepted()] == [0, 2, 3]  # in order; 1 was refused for good
    status, headers, body = receiver.requests[-1]
    assert headers['Idempotency-Key'] == body['id'] and headers['Authorization'] == 'Bearer line3-token'
    assert 'answered 500 Internal Server Error; tried again with backoff' in caplog.text
    assert 'answers again (after 3 failed tries)' in caplog.text
    assert f'answered 422 Unprocessable Entity (no such field): message {sent[1]["id"]} dropped' in caplog.text
    exposed = line_metrics.exposition().decode()
    assert 'mahalanobisad_messages_rejected_total{destination="http://127.0.0.1' in exposed
    assert 'line3-token' not in caplog.text


def test_video_publishes_each_frame_drift_and_summary_to_mqtt_and_a_webhook(tmp_path, broker, receiver, line_feat,
                                                                             model_dir, small_train, caplog, capsys):
    subscriber = Subscriber(broker.port)
    clip, report = str(tmp_path / 'dark.mp4'), str(tmp_path / 'frames.jsonl')
    frames = [darkened(p) for p in image_utils.list_images(small_train)[:5]]  # the light went down
    writer = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*'mp4v'), 5, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(frame)
    writer.release()
    mqtt_url = f'mqtt://127.0.0.1:{broker.port}/line3/verdicts'
    common = ['-f', line_feat, '--model_dir', model_dir, '-v', clip, '--no_figures']
    try:
        assert mahalanobisad.run(common + ['--json', report, '--drift_window', '3', '--publish', mqtt_url,
                                           '--publish', receiver.url, '--outbox', str(tmp_path / 'o.outbox')]) == 0
        wait_for(lambda: len(subscriber.messages) >= 7, 10, 'the messages')
    finally:
        subscriber.close()
    kinds = [m['type'] for m in subscriber.messages]
    assert kinds == ['verdict'] * 3 + ['drift'] + ['verdict'] * 2 + ['summary']
    assert [m['id'] for m in receiver.accepted()] == subscriber.ids()  # the same messages to both
    first = subscriber.messages[0]
    assert set(first) == {'schema', 'type', 'id', 'time', 'host', 'source', 'frame', 'time_s', 'score', 'threshold',
                          'verdict', 'anomaly', 'conditions'}
    assert first['schema'] == publish.SCHEMA and first['source'] == f'video:{clip}' and first['frame'] == 0
    assert first['verdict'] == ('ANOMALY' if first['anomaly'] else 'normal') and first['conditions']['drift']
    assert 'brightness low' in first['conditions']['outside']
    drift = subscriber.messages[3]['drift']
    assert drift['state'] == 'started' and drift['drifted'] == 3 and drift['outside']['brightness low'] == 3
    summary = subscriber.messages[-1]['summary']
    assert summary['frames_scored'] == 5 and summary['drifted'] == 5
    lines = [json.loads(line) for line in open(report)]
    assert [next(iter(line)) if len(line) == 1 else 'frame' for line in lines] == \
        ['frame'] * 3 + ['drift'] + ['frame'] * 2 + ['summary']
    assert 'conditions drift: 3 of the last 3 images' in caplog.text

    # An outbox that is not ours: one line, exit code 1, the file untouched.
    foreign = str(tmp_path / 'results.db')
    with sqlite3.connect(foreign) as db:
        db.execute('CREATE TABLE results (path, score)')
    before = digest(foreign)
    capsys.readouterr()
    assert mahalanobisad.run(common + ['--publish', mqtt_url, '--outbox', foreign]) == 1
    assert capsys.readouterr().err == (f'mahalanobisad.py: error: {foreign} is an SQLite database of another program '
                                       '(application id 0): it is left as it is; give another --outbox\n')
    assert digest(foreign) == before


def test_unreachable_broker_at_start_sigterm_keeps_the_messages_and_the_next_run_sends_them_first(
        tmp_path, line_feat, model_dir):
    port, incoming, report = free_port(), tmp_path / 'in', tmp_path / 'w.jsonl'
    incoming.mkdir()
    shutil.copy(SAMPLE, incoming / 'a.png')
    shutil.copy(SAMPLE, incoming / 'b.png')
    url, box = f'mqtt://127.0.0.1:{port}/line3/verdicts', str(tmp_path / 'line3.outbox')
    process = subprocess.Popen([sys.executable, 'mahalanobisad.py', '-f', line_feat, '--model_dir', model_dir,
                                '--watch', str(incoming), '--no_figures', '--json', str(report), '--publish', url,
                                '--outbox', box], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: report.exists() and len(open(report).readlines()) >= 2, 240, 'two JSON lines')
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert 'cannot reach the broker; messages wait in the outbox' in err  # started anyway, queued, warned
    assert '3 messages not acknowledged yet stay in the outbox' in err and 'Traceback' not in err

    broker = Broker(str(tmp_path), port).start()
    subscriber = Subscriber(port)
    try:
        with publish.Publisher([url], box, retry_s=FAST_RETRY) as publisher:
            publisher.publish(publish.message('verdict', 'the next run', n=0))
            wait_for(lambda: len(subscriber.messages) >= 4, 20, 'the four messages')
    finally:
        subscriber.close()
        broker.stop()
    assert [m['type'] for m in subscriber.messages] == ['verdict', 'verdict', 'summary', 'verdict']
    assert {os.path.basename(m['path']) for m in subscriber.messages[:2]} == {'a.png', 'b.png'}
    assert subscriber.messages[2]['summary']['interrupted'] and subscriber.messages[3]['source'] == 'the next run'


# ----------------------------------------------------------------------------------------------
# conditions
# ----------------------------------------------------------------------------------------------

def test_darkened_and_blurred_images_drift_training_images_do_not(line_feat, model_dir, small_train, tmp_path):
    detector = Detector.load(line_feat, model_dir=model_dir)
    assert detector.conditions_.n == 12 and detector.conditions_.features.threshold > 0
    train = image_utils.list_images(small_train)
    rgb = [cv2.imread(p)[..., ::-1] for p in train[:4]]
    dark = [darkened(p)[..., ::-1] for p in train[:4]]
    blurred = [cv2.GaussianBlur(image, (0, 0), 2) for image in rgb]
    judged = [r.conditions for r in detector.inspect(train + dark + blurred)]
    assert not any(c.drift for c in judged[:len(train)])
    assert all(c.drift and 'brightness low' in c.outside for c in judged[len(train):len(train) + 4])
    assert all(c.drift and 'sharpness low' in c.outside for c in judged[len(train) + 4:])
    # Sharpness is relative to contrast: darkening leaves it, blurring takes it.
    views = [image_utils.network_view(image, 256, 224) for image in (rgb[0], dark[0], blurred[0])]
    plain, dim, soft = (conditions.measure(view) for view in views)
    assert dim[0] < 0.65 * plain[0] and dim[2] == pytest.approx(plain[2], rel=0.05) and soft[2] < 0.7 * plain[2]

    # A damaged range in a feature file is refused like any other damage.
    for damage in ({'low': [0, 'x', 0]}, {'features': dict(detector.meta_['conditions']['features'],
                                                                means=['AAAA', 'AAAA'])}):
        meta = dict(detector.meta_, conditions=dict(detector.meta_['conditions'], **damage))
        with pytest.raises(FeatureFileError, match='damaged feature file: conditions unusable'):
            feature_file.check_meta('f.pkl', meta)


def test_drift_window_warns_once_when_most_drift_and_once_when_it_ends():
    window = conditions.DriftWindow(4)
    normal = conditions.Conditions(1, 1, 1, drift=False)
    dark = conditions.Conditions(0, 1, 1, drift=True, outside=('brightness low',))
    events = [window.add(c) for c in [normal, normal, dark, dark, dark, dark, normal, normal, normal, normal]]
    assert [e and e['state'] for e in events] == [None, None, None, None, 'started', None, None, None, 'ended', None]
    assert events[4] == {'state': 'started', 'window': 4, 'drifted': 3, 'outside': {'brightness low': 3}}
    assert window.add(conditions.Conditions(0, 0, 0)) is None  # unjudged: an old feature file
    with pytest.raises(ValueError):
        conditions.DriftWindow(0)


def test_score_shift_window_warns_once_when_most_score_high_and_once_when_it_ends():
    window = conditions.ScoreShiftWindow(10)
    assert (window.start, window.end) == (10, 6)  # P(10 of 10 above | exchangeable) = 1/1024 <= 0.001
    scores = [0.4, 0.9] + [0.8] * 9 + [0.1] * 5
    events = [window.add(score, reference=0.5) for score in scores]
    assert [e and e['state'] for e in events] == [None] * 10 + ['started'] + [None] * 3 + ['ended', None]
    assert events[10] == {'state': 'started', 'window': 10, 'above_median': 10, 'p': 0.000977}
    assert events[14] == {'state': 'ended', 'window': 10, 'above_median': 6, 'p': 0.377}
    for size in (0, 9, conditions.MAX_SHIFT_WINDOW + 1):
        with pytest.raises(ValueError):
            conditions.ScoreShiftWindow(size)


def test_score_shift_window_keeps_its_rate_on_exchangeable_images_and_sees_a_shift():
    """Held-out scores and new normal scores from one distribution, images below the FPR 0.01 threshold
    counted (as LineReport does): the warning starts about as rarely as its rate says (checked at every
    image, so windows overlap), also with 5% defects among them; scores moved up by half a standard
    deviation (70% above the median) are seen within a few windows."""
    rng = np.random.default_rng(0)
    held_out = rng.normal(size=200)
    reference, threshold = conformal_threshold(held_out, 0.5)[0], conformal_threshold(held_out, 0.01)[0]

    def starts(scores):
        window = conditions.ScoreShiftWindow(100)
        return [i for i, score in enumerate(scores)
                if score < threshold and (window.add(score, reference) or {}).get('state') == 'started']

    normal = rng.normal(size=100_000)
    assert len(starts(normal)) <= 5
    assert len(starts(np.where(rng.random(100_000) < 0.05, 10.0, normal))) <= 5
    shifted = starts(rng.normal(size=2000) + 0.5)
    assert shifted and shifted[0] < 400


def test_line_report_warns_when_scores_shift(line_feat, model_dir, small_train, caplog):
    detector = Detector.load(line_feat, model_dir=model_dir)
    frames = [cv2.cvtColor(darkened(p, 0.3), cv2.COLOR_BGR2RGB) for p in image_utils.list_images(small_train)[:10]]
    results = list(detector.inspect(frames))
    assert all(r.anomaly for r in results)  # ANOMALY verdicts are left out of the window: no warning
    with publish.LineReport(detector, 'test', shift_window=10) as report:
        assert [r for result in results for r in report.scored(result, frame=result.index)] == []
    detector.set_threshold(1e9, 'a line that flags nothing')  # verdicts normal: the window counts them all
    line_metrics = metrics.Metrics(lambda: detector.threshold_)
    with publish.LineReport(detector, 'test', metrics=line_metrics, shift_window=10) as report:
        records = [r for result in detector.inspect(frames) for r in report.scored(result, frame=result.index)]
        exposed = line_metrics.exposition().decode()
    shift = next(r['score_shift'] for r in records if 'score_shift' in r)
    assert shift == {'state': 'started', 'window': 10, 'above_median': 10, 'p': 0.000977}
    assert 'mahalanobisad_score_shift_warning 1.0' in exposed
    assert 'scores shifted: 10 of the last 10 images scored above the median' in caplog.text


# ----------------------------------------------------------------------------------------------
# the console: results to the line, /metrics, never unauthenticated on the network
# ----------------------------------------------------------------------------------------------

def test_console_tells_the_line_and_serves_metrics(tmp_path, line_feat, model_dir, receiver):
    detector = Detector.load(line_feat, model_dir=model_dir)
    line_metrics = metrics.Metrics(lambda: detector.threshold_)
    publisher = publish.Publisher([receiver.url], str(tmp_path / 'console.outbox'), metrics=line_metrics)
    with publish.LineReport(detector, 'console', publisher, line_metrics) as report:
        client = TestClient(web_app.create_app(web_app.Console(detector, line_feat, report=report), 'tok'))
        auth = {'Authorization': 'Bearer tok'}
        with open(SAMPLE, 'rb') as f:
            answer = client.post('/api/score', files={'file': ('part 7.png', f, 'image/png')}, headers=auth).json()
        assert set(answer['conditions']) == {'brightness', 'contrast', 'sharpness', 'features', 'drift', 'outside'}
        assert client.post('/api/score', files={'file': ('x.png', b'not an image', 'image/png')},
                           headers=auth).status_code == 400
        assert client.get('/metrics').status_code == 401
        scraped = client.get('/metrics', headers=auth)
        assert scraped.status_code == 200 and scraped.headers['content-type'].startswith('text/plain')
        assert 'mahalanobisad_images_total 1.0' in scraped.text and 'mahalanobisad_failures_total 1.0' in scraped.text
        assert client.post('/metrics', headers=auth).status_code == 405  # read-only
        wait_for(lambda: len(receiver.requests) == 2, 10, 'the console\'s messages')
    scored, failed = [body for _, _, body in receiver.requests]
    assert (scored['source'], scored['path'], scored['score']) == ('console', 'part 7.png', answer['score'])
    assert failed['verdict'] == 'error' and failed['path'] == 'x.png' and 'x.png' in failed['error']


def test_console_on_the_network_is_never_unauthenticated(monkeypatch, line_feat, model_dir, caplog):
    assert web_app.console_token('127.0.0.1', None) == (None, False)
    assert web_app.console_token('localhost', None) == (None, False)
    assert web_app.console_token('::1', 'given') == ('given', False)
    assert web_app.console_token('0.0.0.0', 'given') == ('given', False)
    token, made = web_app.console_token('192.168.1.20', None)
    assert made and len(token) >= 32
    served = {}
    monkeypatch.setattr(web_app.uvicorn, 'run', lambda app, **kwargs: served.update(app=app, **kwargs))
    caplog.set_level('INFO')
    assert web_app.run(['--feat', line_feat, '--model_dir', model_dir, '--host', '0.0.0.0', '--port', '8123']) == 0
    token = served['app'].token
    assert token and f'http://{socket.gethostname()}:8123/?token={token}' in caplog.text
    client = TestClient(served['app'])
    assert client.get('/api/model').status_code == 401
    assert client.get('/api/model', headers={'Authorization': f'Bearer {token}'}).status_code == 200
