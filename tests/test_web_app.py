"""The web console: its API through an ASGI test client (every endpoint and every refusal), then the page in
a real browser: Debian's headless Chromium driven by Playwright (installed by .ci/run; Playwright's own browser
download is never used)."""
import base64
import contextlib
import json
import os
import re
import shutil
import threading
import time

import cv2
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

import image_utils
import thresholds
import web_app
from mahalanobisad import Detector
from tests.conftest import REPO

TOKEN = 'line3-secret'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
DEFECT = os.path.join(REPO, 'images', 'broken_large_000.png')
GOOD = os.path.join(REPO, 'images', 'good_000.png')


@pytest.fixture(scope='module')
def fitted_feat(tmp_path_factory, small_train, model_dir):
    """A feature file fitted on 12 sample images, its thresholds F1-optimal on the sample images + gt_masks
    as the CLI stores them. (The hold-out threshold of 12 images, their largest held-out score, is below
    the sample's good test images: they were photographed apart from the training images.)"""
    path = str(tmp_path_factory.mktemp('web_feat') / 'small.pkl')
    detector = Detector(model='lite0', model_dir=model_dir).fit(image_utils.list_images(small_train), source=small_train)
    thresholds.choose(detector, labelled=thresholds.LabelledSet.find(os.path.join(REPO, 'images'),
                                                                     os.path.join(REPO, 'gt_masks')))
    detector.save(path)
    return path


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """A data root with images in a subfolder, a non-image, and symlinks pointing out of it."""
    base = tmp_path_factory.mktemp('line')
    root, outside = base / 'root', base / 'outside'
    (root / 'lot1').mkdir(parents=True)
    outside.mkdir()
    shutil.copy(DEFECT, root / 'lot1' / 'defect.png')
    shutil.copy(GOOD, root / 'lot1' / 'good.png')
    (root / 'lot1' / 'notes.png').write_text('not an image')
    shutil.copy(GOOD, outside / 'secret.png')
    os.symlink(outside, root / 'escape')
    os.symlink(outside / 'secret.png', root / 'lot1' / 'linked_out.png')
    return str(root)


def labelled():
    return web_app.labelled_set(web_app.parse_args(['--feat', 'x', '--test_dir', os.path.join(REPO, 'images'),
                                                    '--gt_dir', os.path.join(REPO, 'gt_masks')]))


def make_client(feat, model_dir, data_root=None, token=TOKEN, max_upload_mb=20, labelled_set=None):
    detector = Detector.load(feat, model_dir=model_dir)
    console = web_app.Console(detector, feat, data_root, labelled_set)
    if labelled_set is not None:
        console.score_labelled(*labelled_set[:2])
    return TestClient(web_app.create_app(console, token, max_upload_mb))


@pytest.fixture(scope='module')
def client(fitted_feat, model_dir, data_root):
    """Read-only tests share one console (token required, sample labelled set scored)."""
    return make_client(fitted_feat, model_dir, data_root, labelled_set=labelled())


@pytest.fixture
def own_feat(tmp_path, fitted_feat):
    """A copy of the feature file for a test that writes to it."""
    path = str(tmp_path / 'own.pkl')
    shutil.copy(fitted_feat, path)
    return path


def score(client, path, name=None, headers=AUTH):
    with open(path, 'rb') as f:
        return client.post('/api/score', files={'file': (name or os.path.basename(path), f, 'image/png')},
                           headers=headers)


def test_model_card(client):
    r = client.get('/api/model', headers=AUTH)
    assert r.status_code == 200
    card = r.json()
    assert {'model', 'method', 'threshold', 'pixel_threshold', 'threshold_source', 'n_train_images'} <= set(card)
    assert card['model'] == 'efficientnet-lite0' and card['method'] == 'mahalanobis'
    assert card['n_train_images'] == 12 and card['threshold'] > 0 and card['data_root'] is True


def test_score_defect_and_good(client):
    defect, good = score(client, DEFECT), score(client, GOOD)
    assert defect.status_code == good.status_code == 200
    assert defect.json()['anomaly'] is True and good.json()['anomaly'] is False
    assert defect.json()['score'] > defect.json()['threshold'] > good.json()['score']
    assert 'score;dur=' in defect.headers['server-timing']
    prefix = 'data:image/png;base64,'
    assert defect.json()['figure'].startswith(prefix)
    figure = cv2.imdecode(np.frombuffer(base64.b64decode(defect.json()['figure'][len(prefix):]), np.uint8),
                          cv2.IMREAD_COLOR)
    assert figure.shape[1] > 4 * 256  # the four panels


def test_labelled_scores_for_the_threshold_control(client):
    scores = client.get('/api/scores', headers=AUTH).json()
    assert scores['state'] == 'ready' and 'images' in scores['source']
    assert len(scores['scores']) == len(scores['labels']) == 16 and sum(scores['labels']) == 12
    uploaded = score(client, DEFECT).json()['score']
    assert uploaded == pytest.approx(scores['scores'][0], rel=1e-5)  # broken_large_000 is first


def test_holdout_scores_without_labelled_images(fitted_feat, model_dir):
    scores = make_client(fitted_feat, model_dir).get('/api/scores', headers=AUTH).json()
    assert scores['state'] == 'ready' and 'hold-out' in scores['source']
    assert len(scores['scores']) >= 2 and not any(scores['labels'])


def test_save_threshold_writes_the_feature_file(own_feat, model_dir):
    client = make_client(own_feat, model_dir)
    r = client.post('/api/threshold', json={'threshold': 123.5}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()['threshold'] == 123.5
    assert re.fullmatch(r'set in the console on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC', r.json()['threshold_source'])
    reloaded = Detector.load(own_feat, model_dir=model_dir)
    assert reloaded.threshold_ == 123.5 and reloaded.threshold_source_ == r.json()['threshold_source']
    assert client.get('/api/model', headers=AUTH).json()['threshold'] == 123.5
    assert score(client, GOOD).json()['threshold'] == 123.5
    assert not [f for f in os.listdir(os.path.dirname(own_feat)) if f.endswith('.tmp')]


@pytest.mark.parametrize('body', ['{"threshold": "high"}', '{"threshold": NaN}', '{"threshold": Infinity}',
                                  '{"threshold": true}', '{"threshold": null}', '{}', '[1]', '{"threshold": 1',
                                  '\xff\xfe', '[' * 50000])
def test_bad_threshold_bodies(client, body):
    r = client.post('/api/threshold', content=body.encode('latin-1'), headers=dict(AUTH, **{'Content-Type': 'application/json'}))
    assert r.status_code in (400, 413) and 'error' in r.json()


def test_bad_uploads(client, tmp_path):
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    assert score(client, str(text)).status_code == 400
    assert score(client, str(empty)).status_code == 400
    assert client.post('/api/score', data={'other': 'x'}, headers=AUTH).status_code == 400
    assert client.post('/api/score', content=b'raw bytes', headers=AUTH).status_code == 400
    broken = client.post('/api/score', content=b'--x\r\nContent-Disposition: form-data; name="file"\r\n',
                         headers=dict(AUTH, **{'Content-Type': 'multipart/form-data; boundary=x'}))
    assert broken.status_code == 400 and 'error' in broken.json()
    assert client.get('/api/model', headers=AUTH).status_code == 200  # still serving


def test_upload_over_the_limit(fitted_feat, model_dir, tmp_path):
    client = make_client(fitted_feat, model_dir, max_upload_mb=0.1)
    big = tmp_path / 'big.png'
    cv2.imwrite(str(big), np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8))  # ~480 kB
    r = score(client, str(big))
    assert r.status_code == 413 and 'limit' in r.json()['error']

    def chunks():  # no Content-Length: the limit holds while the body is read
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(20):
            yield b'\0' * 65536
    r = client.post('/api/score', content=chunks(),
                    headers=dict(AUTH, **{'Content-Type': 'multipart/form-data; boundary=b'}))
    assert r.status_code == 413
    assert score(client, GOOD).status_code == 200


def test_token(client):
    assert client.get('/api/model').status_code == 401
    assert client.get('/api/model', headers={'Authorization': 'Bearer wrong'}).status_code == 401
    assert client.get('/api/model', headers={'Authorization': TOKEN}).status_code == 401
    assert client.get(f'/api/model?token={TOKEN}').status_code == 401  # the API wants the header
    assert score(client, GOOD, headers={}).status_code == 401
    r = client.get('/api/model', headers={'Authorization': 'Bearer wrong'})
    assert r.json()['error'].startswith('missing or wrong token')


def test_page_token_then_cookie(fitted_feat, model_dir):
    token = 'a b+c;d%'  # survives URL and cookie encoding
    client = make_client(fitted_feat, model_dir, token=token)
    assert client.get('/').status_code == 401
    assert client.get('/static/console.js').status_code == 401
    assert client.get('/', params={'token': 'a b'}).status_code == 401
    page = client.get('/', params={'token': token})
    assert page.status_code == 200 and '<title>MahalanobisAD console</title>' in page.text
    assert 'HttpOnly' in page.headers['set-cookie'] and 'SameSite=Strict' in page.headers['set-cookie']
    assert "default-src 'self'" in page.headers['content-security-policy']
    assert client.get('/static/console.js').status_code == 200  # the cookie, as the browser sends it
    assert client.get('/api/model').status_code == 401          # but not for the API
    client.cookies.clear()
    assert client.get('/static/console.css').status_code == 401


def test_images_and_folder_under_the_data_root(client):
    listing = client.get('/api/images?dir=lot1', headers=AUTH).json()
    assert listing['images'] == ['lot1/defect.png', 'lot1/good.png', 'lot1/notes.png']  # not the symlink out
    root = client.get('/api/images', headers=AUTH).json()
    assert root['dirs'] == ['lot1'] and root['count'] == 3

    r = client.post('/api/folder', json={'dir': 'lot1'}, headers=AUTH)
    assert r.status_code == 200 and r.headers['content-type'].startswith('application/x-ndjson')
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0]['total'] == 3 and lines[-1] == {'done': True, 'scored': 2, 'anomalous': 1}
    by_path = {line['path']: line for line in lines[1:-1]}
    assert by_path['lot1/defect.png']['anomaly'] is True and by_path['lot1/good.png']['anomaly'] is False
    assert 'error' in by_path['lot1/notes.png']
    assert by_path['lot1/defect.png']['score'] == pytest.approx(score(client, DEFECT).json()['score'], rel=1e-5)

    one = client.get('/api/inspect?path=lot1/defect.png', headers=AUTH).json()
    assert one['anomaly'] is True and one['figure'].startswith('data:image/png')
    assert client.get('/api/inspect?path=lot1/notes.png', headers=AUTH).status_code == 400
    assert client.get('/api/inspect?path=lot1/none.png', headers=AUTH).status_code == 404


@pytest.mark.parametrize('path', ['..', '../outside', 'lot1/../..', '/etc', '/etc/passwd', 'escape', 'escape/secret.png',
                                  'lot1/linked_out.png', '~root', '%2e%2e'])
def test_paths_outside_the_data_root(client, path):
    expected = 404 if path == '%2e%2e' else 403  # a literal name '%2e%2e' is inside the root, and absent
    assert client.get('/api/images', params={'dir': path}, headers=AUTH).status_code == expected
    assert client.get('/api/inspect', params={'path': path}, headers=AUTH).status_code in (expected, 404)
    r = client.post('/api/folder', json={'dir': path}, headers=AUTH)
    assert r.status_code in (expected, 404) and 'error' in r.json()


def test_no_data_root(fitted_feat, model_dir):
    client = make_client(fitted_feat, model_dir, token=None)
    assert client.get('/api/model').json()['data_root'] is False
    assert client.get('/api/images').status_code == 403
    assert client.post('/api/folder', json={'dir': ''}).status_code == 403


def test_review_queue_preview_apply_and_undo(own_feat, model_dir):
    """Results can be marked normal / defect; the queue lists them nearest the threshold first; preview
    writes nothing; apply teaches the feature file both (partial fit, labelled defect); undo reverts both;
    bad review requests are 4xx and the console keeps serving."""
    client = make_client(own_feat, model_dir)
    good, defect = score(client, GOOD).json(), score(client, DEFECT).json()
    queue = client.get('/api/review', headers=AUTH).json()
    distances = [abs(item['score'] - queue['threshold']) for item in queue['queue']]
    assert distances == sorted(distances) and {item['id'] for item in queue['queue']} == {good['id'], defect['id']}
    assert client.post('/api/review', json={'id': 'nope', 'label': 'normal'}, headers=AUTH).status_code == 404
    assert client.post('/api/review', json={'id': good['id'], 'label': 'maybe'}, headers=AUTH).status_code == 400
    assert client.post('/api/review/apply', headers=AUTH).status_code == 400  # nothing marked yet
    client.post('/api/review', json={'id': good['id'], 'label': 'normal'}, headers=AUTH)
    client.post('/api/review', json={'id': defect['id'], 'label': 'defect'}, headers=AUTH)
    preview = client.post('/api/review/preview', headers=AUTH).json()
    assert preview['n_normal'] == 1 and preview['n_defect'] == 1 and preview['n_defects'] == 1
    assert preview['recall'] in (0.0, 1.0) and 0 <= preview['holdout_fpr'] <= 1 and preview['n_holdout'] == 13
    assert len(Detector.load(own_feat, model_dir=model_dir).meta_['history']) == 1  # a preview writes nothing
    applied = client.post('/api/review/apply', headers=AUTH).json()
    assert [e['kind'] for e in applied['history']] == ['fit', 'add_good', 'add_defects'] and applied['queue'] == []
    assert applied['model']['threshold'] == pytest.approx(preview['threshold_after'])
    stored = Detector.load(own_feat, model_dir=model_dir)
    assert stored.meta_['n_train_images'] == 13 and stored.threshold_ == pytest.approx(preview['threshold_after'])
    undone = client.post('/api/review/undo', headers=AUTH).json()
    assert [e['kind'] for e in undone['history']][-2:] == ['undo', 'undo'] and undone['model']['n_train_images'] == 12
    answer = client.post('/api/review/undo', headers=AUTH)
    assert answer.status_code == 409 and 'no change to undo' in answer.json()['error']
    assert client.get('/api/model', headers=AUTH).status_code == 200


def test_other_bad_requests(client):
    for r in (client.get('/nope', headers=AUTH), client.delete('/api/model', headers=AUTH),
              client.get('/api/inspect', headers=AUTH), client.post('/api/folder', json={'dir': 5}, headers=AUTH),
              client.get('/api/images', params={'dir': 'a\x00b'}, headers=AUTH)):
        assert 400 <= r.status_code < 500 and 'error' in r.json(), r
    assert client.post('/api/threshold', content=b'x' * 100_000,
                       headers=dict(AUTH, **{'Content-Type': 'application/json'})).status_code == 413
    assert client.get('/api/model', headers=AUTH).status_code == 200


def test_command_line_errors(capsys, tmp_path):
    assert web_app.run(['--feat', str(tmp_path / 'none.pkl')]) == 1
    assert 'feature file not found' in capsys.readouterr().err
    for flag in ('--data_root', '--test_dir', '--gt_dir'):
        with pytest.raises(SystemExit) as e:
            web_app.parse_args(['--feat', 'x', flag, str(tmp_path / 'none')])
        assert e.value.code == 2
        assert f'{flag} is not a directory' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the page in a browser
# ----------------------------------------------------------------------------------------------

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn on a free loopback port in a thread -> its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, 'uvicorn did not start'
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(page, expression, timeout=30):
    """Poll a JS expression (page.wait_for_function would eval inside the page, which its CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f'timed out waiting for {expression}'
        time.sleep(0.05)


def test_browser_inspect_score_folder_move_threshold_and_save(tmp_path, fitted_feat, model_dir, data_root):
    assert os.path.exists(CHROMIUM), 'Debian chromium is needed: apt-get install chromium (see .ci/run)'
    from playwright.sync_api import sync_playwright
    feat = str(tmp_path / 'console.pkl')
    shutil.copy(fitted_feat, feat)
    console = web_app.Console(Detector.load(feat, model_dir=model_dir), feat, data_root, labelled())
    console.score_labelled(*labelled()[:2])
    before = console.detector.threshold_
    with serving(web_app.create_app(console, TOKEN)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors = []
            page.on('pageerror', lambda e: errors.append(str(e)))
            page.goto(f'{url}/?token={TOKEN}')
            page.wait_for_selector('body[data-ready=true]', timeout=30_000)
            assert page.text_content('#card-model') == 'efficientnet-lite0'
            assert 'token' not in page.url  # taken out of the address bar

            page.set_input_files('#file-input', DEFECT)
            page.wait_for_selector('#result-rows .verdict-anomaly', timeout=30_000)
            assert page.text_content('#result-rows tr td') == os.path.basename(DEFECT)
            assert page.text_content('#result-rows .verdict-anomaly') == 'ANOMALY'
            wait_until(page, "document.getElementById('figure').naturalWidth > 1000")

            page.select_option('#folder-select', 'lot1')  # into the folder, then score it (streamed)
            page.wait_for_selector('#folder-count:has-text("3 images")')
            page.click('#score-folder')
            page.wait_for_selector('#status:has-text("Scored 2 images of lot1: 1 anomalous")', timeout=30_000)
            rows = page.locator('#result-rows tr')
            assert rows.count() == 4 and rows.nth(0).locator('td').nth(2).text_content() == 'ANOMALY'
            page.click('#result-rows tr:has-text("lot1/good.png")')  # its figure is drawn on demand
            page.wait_for_selector('#figure-note:has-text("lot1/good.png")')
            assert page.locator('#result-rows tr:has-text("lot1/notes.png") .verdict-error').count() == 1

            fpr_before = page.text_content('#fpr')
            page.focus('#threshold-slider')
            for _ in range(60):
                page.keyboard.press('ArrowLeft')  # lower: more false alarms on the good sample images
            moved = float(page.input_value('#threshold-value'))
            assert moved < before and page.text_content('#fpr') != fpr_before
            page.click('#save-threshold')
            page.wait_for_selector('#card-source:has-text("set in the console")')
            card = page.evaluate("""async () => (await fetch('/api/model', {headers: {Authorization:
                                    'Bearer ' + sessionStorage.getItem('console_token')}})).json()""")
            assert card['threshold'] == pytest.approx(moved, rel=1e-3)
            assert card['threshold_source'].startswith('set in the console')

            # review: a false alarm marked normal, previewed (FPR shown), applied (learnt, in the history), undone
            page.click('#result-rows tr:has-text("lot1/good.png") .review-normal')
            page.wait_for_selector('#review-rows tr.labelled:has-text("lot1/good.png")')
            page.click('#review-preview-button')
            page.wait_for_selector('#review-preview:has-text("held-out good images")', timeout=120_000)
            page.click('#review-apply')
            page.wait_for_selector('#history li:has-text("add_good 1 images")', timeout=120_000)
            assert page.text_content('#card-train').startswith('13')
            page.click('#review-undo')
            page.wait_for_selector('#history li:has-text("undo of #1")', timeout=120_000)
            assert page.text_content('#card-train').startswith('12')
            assert not errors
        finally:
            browser.close()
    stored = Detector.load(feat, model_dir=model_dir)
    assert stored.threshold_ == pytest.approx(moved, rel=1e-3)
    assert [e['kind'] for e in stored.meta_['history']] == ['fit', 'add_good', 'undo']
