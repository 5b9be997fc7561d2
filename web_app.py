"""A web console for the line: inspect parts, review results and set the threshold in a browser.

    python3 web_app.py --feat bottle.pkl                 # serves http://127.0.0.1:8000
    python3 web_app.py --feat bottle.pkl --data_root /srv/line3 --host 0.0.0.0 --token SECRET
    python3 web_app.py --feat bottle.pkl --publish mqtt://broker:1883/line3/verdicts   # results to the line too

One page (static/) and a JSON API over the same fitted `Detector` as the command line: the model card,
scoring uploaded images or a folder under --data_root (streamed through the batch pipeline, with
progress), and a threshold control over the scores of the labelled (or held-out) images that saves the
chosen threshold into the feature file. Each image scored for a user (not the labelled images of the
threshold control) is told to the line as the live modes tell it (publish.LineReport: --publish,
metrics at /metrics and on --metrics_port). On an address other than loopback the console never
serves without a token: without --token it makes one and prints the URL that carries it, as Jupyter
does. FastAPI + uvicorn: a well-kept ASGI stack whose request parsing (multipart, JSON) and test
client we do not have to write.
"""
import argparse
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
import urllib.parse

import cv2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import cli
import history
import image_utils
import metrics
import publish
import review
import thresholds
from detector import Detector
from errors import TOOL_ERRORS

logger = logging.getLogger('web_app')

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
STATIC_FILES = {'/': 'index.html', '/static/console.js': 'console.js', '/static/console.css': 'console.css'}
LOOPBACK_NAMES = ('localhost',)
TOKEN_COOKIE = 'console_token'
CONSOLE_SOURCE = 'set in the console'
MAX_LISTED_IMAGES = 5000       # an /api/images answer lists at most this many
MULTIPART_OVERHEAD = 64 << 10  # bytes of a multipart body beyond the file itself (boundaries, headers)
MAX_JSON_BODY = 64 << 10       # a JSON request is a few bytes; anything larger is refused unread
MAX_REMEMBERED = 500           # results kept for review (their uploads kept on disk), the oldest dropped first
REVIEW_LABELS = ('normal', 'defect')  # "normal (false alarm)" -> Detector.partial_fit; "defect (missed)" -> add_defects
# What a browser may do with our pages: only this server's own scripts and styles, figures as data URLs.
SECURITY_HEADERS = [(b'content-security-policy', b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                                 b"frame-ancestors 'none'; base-uri 'none'"),
                    (b'x-content-type-options', b'nosniff'), (b'referrer-policy', b'no-referrer'),
                    (b'cache-control', b'no-store')]


def parse_args(argv=None):
    p = cli.OneLineArgumentParser(prog='web_app.py', description=__doc__.split('\n\n')[0],
                                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-f', '--feat', required=True, help='feature file fitted by mahalanobisad.py (threshold saved here)')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (0.0.0.0: every interface)')
    p.add_argument('--port', type=int, default=8000, help='TCP port')
    p.add_argument('--by', default=None, metavar='NAME',
                   help='who the changes applied in the console are recorded as (default: the OS user)')
    p.add_argument('--data_root', default=None, help='folder whose images may be browsed and scored (none by default)')
    p.add_argument('--token', default=None,
                   help='require "Authorization: Bearer TOKEN" on every request (the page: open /?token=TOKEN); '
                        'on an address other than loopback one is made when none is given')
    p.add_argument('--max_upload_mb', type=float, default=20, help='largest accepted upload, MiB')
    p.add_argument('--test_dir', default=None, help='labelled images for the threshold control (default images, if present)')
    p.add_argument('--gt_dir', default=None, help='masks of --test_dir images (default gt_masks)')
    p.add_argument('-m', '--model', default=None, help='backbone to check the feature file against (default: its own)')
    p.add_argument('--method', default=None, help='method to check the feature file against (default: its own)')
    p.add_argument('-bs', '--batch_size', type=cli.positive_int, default=16, help='images per backbone run')
    p.add_argument('--model_dir', default='models', help='cache of ONNX backbones')
    p.add_argument('--model_url', default=None, help='base URL of b0..b7 downloads')
    cli.add_line_arguments(p)
    args = p.parse_args(argv)
    cli.check_line_arguments(p, args)
    if not 0 < args.max_upload_mb < 4096:
        p.error(f'--max_upload_mb must be in (0, 4096), got {args.max_upload_mb}')
    for flag in ('data_root', 'test_dir', 'gt_dir'):  # before the model loads: a typo fails at once
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            p.error(f'--{flag} is not a directory: {getattr(args, flag)}')
    return args


class ConsoleError(Exception):
    """A request the console refuses: `status` (4xx) and a one-line message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def png_data_url(bgr):
    # zlib level 1 and the 'up' filter only: measured 33 ms against 55 ms for OpenCV's default PNG
    # (level 1, adaptive filters) on a four-panel figure, for a file 3% larger.
    ok, png = cv2.imencode('.png', bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP])
    return 'data:image/png;base64,' + base64.b64encode(png.tobytes()).decode('ascii')


class Console:
    """The console's state: the detector, its feature file, the data root and the labelled scores.

    Scoring is serialised by `lock` (one image or one batch at a time): on a 2-core line PC,
    parallel requests would only share the cores and multiply the memory.
    """

    def __init__(self, detector, feat_path, data_root=None, labelled=None, report=None, by=None):
        self.detector = detector
        # What the line hears of each image scored for a user (publish.LineReport); metrics always, for /metrics.
        self.report = report or publish.LineReport(detector, 'console',
                                                   metrics=metrics.Metrics(lambda: self.detector.threshold_))
        self.feat_path = feat_path
        self.by = by or history.default_user()
        self.results = {}  # id -> {id, name, path, score, anomaly, label}: what the review queue lists
        self.next_id = 0
        self.data_root = os.path.realpath(data_root) if data_root else None
        self.lock = threading.Lock()
        self.upload_dir = tempfile.TemporaryDirectory(prefix='web_app_uploads_')
        self.scores = {'state': 'none', 'done': 0, 'total': 0, 'source': None, 'scores': [], 'labels': None}
        if labelled is not None:
            self.scores.update(state='scoring', total=len(labelled[0]),
                               source=f'labelled images: {labelled[2]} + {labelled[3]}')
        else:
            self.use_holdout_scores()

    # -- model card and threshold ---------------------------------------------------------------

    def model_card(self):
        d, meta = self.detector, self.detector.meta_
        return {'model': meta.get('backbone'), 'method': meta.get('method'), 'threshold': d.threshold_,
                'pixel_threshold': d.pixel_threshold_, 'threshold_source': d.threshold_source_,
                'n_train_images': meta.get('n_train_images'),
                'input_size': meta.get('input_size'), 'train_dir': meta.get('train_dir'),
                'localizes': d.localizes, 'feature_file': os.path.basename(self.feat_path),
                'data_root': self.data_root is not None}

    def set_threshold(self, value):
        """Use `value` as the image threshold from now on and store it in the feature file (atomically),
        its source saying that it was set in the console, and when."""
        source = f'{CONSOLE_SOURCE} on {time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())} UTC'
        with self.lock:
            self.detector.set_threshold(value, source).save(self.feat_path)
        logger.info('saved to %s', self.feat_path)
        return self.model_card()

    # -- labelled scores (the threshold control's histogram) -------------------------------------

    def use_holdout_scores(self):
        holdout = self.detector.meta_.get('holdout_scores')
        if holdout:
            self.scores.update(state='ready', source='training hold-out (all normal)', scores=list(holdout),
                               labels=[0] * len(holdout), done=len(holdout), total=len(holdout))

    def score_labelled(self, paths, masks):
        """Score the labelled images once (in a background thread at startup) for the histogram."""
        scores, labels = [], []
        try:
            for result in self.inspect(paths, masks, desc='console: labelled images'):
                self.scores['done'] += 1
                if result.error is None:
                    scores.append(result.score)
                    labels.append(int(result.gt_mask is not None and bool(result.gt_mask.any())))
                else:
                    logger.warning('labelled image skipped: %s', result.error)
        except Exception as e:  # a broken labelled set must not take the console down: fall back, say why
            logger.warning('labelled images unusable (%s): threshold control uses the training hold-out', e)
            self.scores.update(state='none', source=None)
            self.use_holdout_scores()
            return
        self.scores.update(state='ready', scores=scores, labels=labels)
        logger.info('scored %d labelled images (%d anomalous) for the threshold control', len(scores), sum(labels))

    # -- inspection -------------------------------------------------------------------------------

    def inspect(self, images, masks=None, desc=None):
        """Detector.inspect, holding the lock only while the pipeline works on the next item, so a
        folder being scored and single uploads take turns. desc: progress bar label (None: no bar)."""
        results = self.detector.inspect(images, masks, desc=desc)
        try:
            while True:
                with self.lock:
                    result = next(results, None)
                if result is None:
                    return
                yield result
        finally:
            results.close()

    def tell_the_line(self, result, title, started):
        """A user's image, scored or not (result.error, the reason naming it as the user knows it), to
        the line: message, metrics, drift and score-shift windows."""
        if result.error is not None:
            self.report.failed(result.error.replace(result.path, title), path=title)
        else:
            self.report.scored(result, time.perf_counter() - started, path=title)

    def inspect_one(self, path, title, started=None, kept=False):
        """-> the JSON answer of one image: score, verdict, threshold, conditions, the four-panel figure
        and the id it is reviewed by. started: time.perf_counter() when the request came (the latency the
        metrics show). kept: `path` is the console's own copy (an upload), deleted when forgotten."""
        started = started or time.perf_counter()
        results = self.inspect([path])
        with contextlib.closing(results):
            result = next(results)
        self.tell_the_line(result, title, started)
        if result.error is not None:  # the reason, naming the image as the user knows it
            raise ConsoleError(400, result.error.replace(path, title))
        return {'name': title, 'score': result.score, 'anomaly': bool(result.anomaly),
                'threshold': self.detector.threshold_, 'conditions': result.conditions.to_json(),
                'id': self.remember(path, title, result.score, kept),
                'figure': png_data_url(self.detector.render_figure(result, title=title))}

    def inspect_upload(self, data, name, started=None):
        if not data:
            raise ConsoleError(400, 'the uploaded file is empty')
        # Through a private file: the upload is decoded by exactly the CLI's code path, and kept for review.
        fd, path = tempfile.mkstemp(dir=self.upload_dir.name, suffix='.upload')
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        try:
            return self.inspect_one(path, name, started, kept=True)
        except ConsoleError:
            os.unlink(path)
            raise

    # -- review: operators correct verdicts, the detector learns them ---------------------------------

    def remember(self, path, name, score, kept=False):
        """Keep a scored image for review -> its id (the oldest of MAX_REMEMBERED forgotten)."""
        with self.lock:
            result_id = str(self.next_id)
            self.next_id += 1
            self.results[result_id] = {'id': result_id, 'name': name, 'path': path, 'score': score, 'label': None,
                                       'kept': kept}
            while len(self.results) > MAX_REMEMBERED:
                oldest = self.results.pop(next(iter(self.results)))
                if oldest['kept']:
                    os.unlink(oldest['path'])
        return result_id

    def set_label(self, result_id, label):
        """Mark a result "normal" (a false alarm), "defect" (missed) or None (not reviewed)."""
        if label is not None and label not in REVIEW_LABELS:
            raise ConsoleError(400, f'"label" must be one of {", ".join(REVIEW_LABELS)} or null')
        result = self.results.get(result_id)
        if result is None:
            raise ConsoleError(404, f'no result {result_id!r} to review (forgotten, or already applied)')
        result['label'] = label
        return self.review_queue()

    def review_queue(self):
        """The results nearest the threshold first (the ones a review is most likely to correct), with
        their labels, the verdict under the current threshold, and the history of changes."""
        threshold = self.detector.threshold_
        queue = sorted(self.results.values(), key=lambda r: abs(r['score'] - threshold))
        entries = self.detector.meta_.get('history', [])
        return {'threshold': threshold, 'history': entries, 'undoable': history.last_undoable(entries) is not None,
                'queue': [{'id': r['id'], 'name': r['name'], 'score': r['score'], 'label': r['label'],
                           'anomaly': r['score'] >= threshold} for r in queue]}

    def _labelled(self):
        """{label: the results marked so} -> ConsoleError 400 where none is marked."""
        labelled = {label: [r for r in self.results.values() if r['label'] == label] for label in REVIEW_LABELS}
        if not any(labelled.values()):
            raise ConsoleError(400, 'no reviewed result: mark results "normal" or "defect" first')
        return labelled

    def _change(self, labelled):
        def change(detector):
            if labelled['normal']:
                detector.partial_fit([r['path'] for r in labelled['normal']], by=self.by)
            if labelled['defect']:
                detector.add_defects([r['path'] for r in labelled['defect']], by=self.by)
        return change

    def preview(self):
        """What applying the labels would give, computed on a copy of the feature file's detector and not
        saved: the thresholds before and after, the share of held-out good images the new threshold flags
        (its FPR on them) and of all labelled defects (its recall)."""
        labelled = self._labelled()
        with self.lock:
            detector = review.update(self.feat_path, self._change(labelled), write=False,
                                     **self.detector.load_options())
        after = detector.thresholds_
        calibration = after.calibration or {}
        return {'n_normal': len(labelled['normal']), 'n_defect': len(labelled['defect']),
                'threshold_before': self.detector.threshold_, 'threshold_after': after.image,
                'source_after': after.description,
                'holdout_fpr': float((detector.holdout_.image >= after.image).mean()),
                'n_holdout': len(detector.holdout_.image),
                'recall': calibration.get('recall'), 'n_defects': calibration.get('n_defects', 0)}

    def apply(self):
        """Teach the feature file the reviewed results (under its lock: a command line updating it at the
        same time waits) and use the updated detector from now on."""
        labelled = self._labelled()
        with self.lock:
            self._use(review.update(self.feat_path, self._change(labelled), **self.detector.load_options()))
            for result in labelled['normal'] + labelled['defect']:
                self.results.pop(result['id'], None)
                if result['kept']:
                    os.unlink(result['path'])
        return self._changed()

    def undo(self):
        with self.lock:
            self._use(review.undo(self.feat_path, self.by, **self.detector.load_options()))
        return self._changed()

    def _use(self, detector):
        """Score with `detector` (the feature file as a review left it) from now on; the line hears its
        threshold."""
        self.detector = self.report.detector = detector

    def _changed(self):
        """After apply or undo: the threshold control's scores again, and the answer (queue and model card)."""
        self.use_holdout_scores()
        return dict(self.review_queue(), model=self.model_card())

    # -- the data root ------------------------------------------------------------------------------

    def resolve(self, relative):
        """`relative` (a path under --data_root, as the page sends it) -> its real path; ConsoleError
        403 for anything that is, or resolves (symlinks included), outside the data root."""
        if self.data_root is None:
            raise ConsoleError(403, 'no --data_root: this console scores uploaded images only')
        if '\x00' in relative:
            raise ConsoleError(400, 'bad path')
        if os.path.isabs(relative) or relative.startswith(('~', '\\')):
            raise ConsoleError(403, f'{relative}: paths are relative to the data root')
        real = os.path.realpath(os.path.join(self.data_root, relative))
        if not self.contains(real):
            raise ConsoleError(403, f'{relative}: outside the data root')
        return real

    def contains(self, real):
        return real == self.data_root or real.startswith(self.data_root + os.sep)

    def relative(self, real):
        return os.path.relpath(real, self.data_root).replace(os.sep, '/')

    def images_under(self, real_dir):
        """Images under `real_dir` (recursively, symlinks into the data root only), real paths."""
        if not os.path.isdir(real_dir):
            raise ConsoleError(404, f'{self.relative(real_dir)}: no such folder')
        try:
            found = image_utils.list_images(real_dir)
        except image_utils.ImageError:
            return []
        return [os.path.realpath(p) for p in found if self.contains(os.path.realpath(p))]

    def list_dir(self, relative):
        real = self.resolve(relative)
        images = self.images_under(real)
        dirs = sorted(entry.name for entry in os.scandir(real)
                      if entry.is_dir() and self.contains(os.path.realpath(entry.path)))
        return {'dir': self.relative(real), 'dirs': dirs, 'count': len(images),
                'images': [self.relative(p) for p in images[:MAX_LISTED_IMAGES]],
                'truncated': len(images) > MAX_LISTED_IMAGES}

    def folder_images(self, relative):
        """Real paths of the images under the data root's `relative` folder (ConsoleError if refused)."""
        return self.images_under(self.resolve(relative))

    def score_folder(self, images):
        """NDJSON lines: {"total"}, then {"index", "path", "score", "anomaly"} (or "error") per image in
        order, then {"done", "scored", "anomalous"}. The images stream through the batch pipeline."""
        yield json.dumps({'total': len(images), 'threshold': self.detector.threshold_}) + '\n'
        scored = anomalous = 0
        started = time.perf_counter()
        for result in self.inspect(images, desc='console: folder'):
            relative = self.relative(images[result.index])
            line = {'index': result.index, 'path': relative}
            self.tell_the_line(result, relative, started)
            started = time.perf_counter()
            if result.error is None:
                line.update(score=result.score, anomaly=bool(result.anomaly),
                            id=self.remember(images[result.index], relative, result.score))
                scored += 1
                anomalous += bool(result.anomaly)
            else:  # the reason, with the path as the page shows it (the data root is not disclosed)
                line['error'] = result.error.replace(images[result.index], relative)
            yield json.dumps(line) + '\n'
        yield json.dumps({'done': True, 'scored': scored, 'anomalous': anomalous}) + '\n'


# ----------------------------------------------------------------------------------------------
# ASGI guards: the token and the body size, before any route runs
# ----------------------------------------------------------------------------------------------

async def send_json(send, status, payload, headers=()):
    body = json.dumps(payload).encode()
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
                            *SECURITY_HEADERS, *headers]})
    await send({'type': 'http.response.body', 'body': body})


class Guard:
    """Pure ASGI middleware: refuses a request without the token (401) or with a body over the
    limit (413; checked on Content-Length and again while the body is read, so a chunked upload
    cannot pass), and adds the security headers to every answer."""

    def __init__(self, app, token=None, max_upload_mb=20):
        self.app, self.token, self.max_upload_mb = app, token, max_upload_mb
        self.max_upload_body = int(max_upload_mb * (1 << 20)) + MULTIPART_OVERHEAD

    def authorised(self, scope):
        """-> (ok, cookie header to set or None)."""
        if self.token is None:
            return True, None
        headers = dict(scope['headers'])
        expected = self.token.encode()
        bearer = headers.get(b'authorization', b'')
        if bearer.startswith(b'Bearer ') and hmac.compare_digest(bearer[7:].strip(), expected):
            return True, None
        if scope['method'] == 'GET' and scope['path'] in STATIC_FILES:
            # The page and its assets: ?token= on the first load, then a same-site cookie, which the
            # browser sends with the page's <script> and <link>. The API itself wants the header.
            query = urllib.parse.parse_qs(scope['query_string'].decode('latin-1'))
            if hmac.compare_digest(query.get('token', [''])[0].encode(), expected):
                value = urllib.parse.quote(self.token, safe='')
                return True, (b'set-cookie', f'{TOKEN_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/'.encode())
            for part in headers.get(b'cookie', b'').decode('latin-1').split(';'):
                name, _, value = part.strip().partition('=')
                if name == TOKEN_COOKIE and hmac.compare_digest(urllib.parse.unquote(value).encode(), expected):
                    return True, None
        return False, None

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'websocket':  # the console has none: refused before anything else
            return await send({'type': 'websocket.close', 'code': 1008})
        if scope['type'] != 'http':  # lifespan
            return await self.app(scope, receive, send)
        ok, cookie = self.authorised(scope)
        if not ok:
            return await send_json(send, 401, {'error': 'missing or wrong token: send "Authorization: Bearer TOKEN" '
                                                        '(the page: open /?token=TOKEN)'},
                                   [(b'www-authenticate', b'Bearer')])
        if scope['path'] == '/api/score':
            limit, too_large = self.max_upload_body, f'upload over the limit of {self.max_upload_mb:g} MiB'
        else:
            limit, too_large = MAX_JSON_BODY, f'request body over the limit of {MAX_JSON_BODY >> 10} KiB'
        length = dict(scope['headers']).get(b'content-length')
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await send_json(send, 413 if length.isdigit() else 400,
                                   {'error': too_large if length.isdigit() else 'bad Content-Length'})
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get('body', b''))
            if received > limit:
                raise HTTPException(413, too_large)
            return message

        async def send_with_headers(message):
            if message['type'] == 'http.response.start':
                message['headers'] = list(message.get('headers', [])) + SECURITY_HEADERS + ([cookie] if cookie else [])
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------

def create_app(console, token=None, max_upload_mb=20):
    """The console's ASGI app: the FastAPI routes behind the Guard. Every error is JSON
    {"error": "..."} with a 4xx code (500 only for a bug, logged)."""
    app = FastAPI(title='MahalanobisAD console', docs_url=None, redoc_url=None, openapi_url=None)
    max_upload = int(max_upload_mb * (1 << 20))

    @app.exception_handler(ConsoleError)
    async def console_error(request, e):
        return JSONResponse({'error': str(e)}, e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse({'error': e.detail if isinstance(e.detail, str) else 'bad request'}, e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse({'error': 'bad request: ' + '; '.join(err.get('msg', '') for err in e.errors())}, 400)

    @app.exception_handler(Exception)
    async def unexpected_error(request, e):  # logged with its traceback; the client gets one line
        logger.exception('unexpected error on %s', request.url.path)
        return JSONResponse({'error': f'internal error: {type(e).__name__}'}, 500)

    for route, name in STATIC_FILES.items():
        app.add_api_route(route, lambda name=name: FileResponse(os.path.join(STATIC_DIR, name)), methods=['GET'])

    @app.get('/api/model')
    def model():
        return console.model_card()

    @app.get('/api/scores')
    def scores():
        return console.scores

    @app.post('/api/score')
    async def score(request: Request):
        started = time.perf_counter()
        async with request.form(max_files=1, max_fields=4) as form:
            upload = form.get('file')
            if upload is None or isinstance(upload, str):
                raise ConsoleError(400, 'send the image as a multipart form field named "file"')
            data = await upload.read(max_upload + 1)
            name = os.path.basename(upload.filename or 'upload')[:200]
        if len(data) > max_upload:
            raise ConsoleError(413, f'upload over the limit of {max_upload_mb:g} MiB')
        answer = await run_in_threadpool(console.inspect_upload, data, name, started)
        return JSONResponse(answer, headers={'server-timing': f'score;dur={(time.perf_counter() - started) * 1e3:.1f}'})

    @app.get('/api/inspect')
    def inspect(path: str):
        real = console.resolve(path)
        if not os.path.isfile(real) or not image_utils.is_image_file(real):
            raise ConsoleError(404, f'{path}: no such image under the data root')
        return console.inspect_one(real, console.relative(real))

    @app.get('/metrics')
    def prometheus_metrics():  # read-only: a scrape changes nothing
        return Response(console.report.metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @app.get('/api/images')
    def images(dir: str = ''):
        return console.list_dir(dir)

    @app.post('/api/folder')
    async def folder(request: Request):
        relative = (await json_body(request)).get('dir', '')
        if not isinstance(relative, str):
            raise ConsoleError(400, '"dir" must be a string')
        images = console.folder_images(relative)  # before the stream starts: a refusal keeps its status
        return StreamingResponse(console.score_folder(images), media_type='application/x-ndjson')

    @app.get('/api/review')
    def review_queue():
        return console.review_queue()

    @app.post('/api/review')
    async def review_label(request: Request):
        body = await json_body(request)
        return console.set_label(str(body.get('id')), body.get('label'))

    @app.post('/api/review/preview')
    def review_preview():
        return tool_errors_as_4xx(console.preview)

    @app.post('/api/review/apply')
    def review_apply():
        return tool_errors_as_4xx(console.apply)

    @app.post('/api/review/undo')
    def review_undo():
        return tool_errors_as_4xx(console.undo)

    @app.post('/api/threshold')
    async def threshold(request: Request):
        value = (await json_body(request)).get('threshold')
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConsoleError(400, '"threshold" must be a finite number')
        return console.set_threshold(float(value))

    return Guard(app, token, max_upload_mb)


def tool_errors_as_4xx(action):
    """action() -> its answer; the tool's own errors (a feature file locked too long, nothing to undo) as
    409 with their one line: the console keeps serving."""
    try:
        return action()
    except TOOL_ERRORS as e:
        raise ConsoleError(409, str(e)) from None


async def json_body(request):
    """The request's JSON object; ConsoleError 400 for anything else (NaN and Infinity included)."""
    try:
        body = json.loads(await request.body(), parse_constant=lambda name: 1 / 0)
    except (ValueError, ZeroDivisionError, UnicodeDecodeError, RecursionError):
        raise ConsoleError(400, 'the body must be a JSON object') from None
    if not isinstance(body, dict):
        raise ConsoleError(400, 'the body must be a JSON object')
    return body


def labelled_set(args):
    """(paths, masks, test_dir, gt_dir) of the labelled images (the CLI's defaults), or None."""
    labelled = thresholds.LabelledSet.find(args.test_dir, args.gt_dir)
    return None if labelled is None else (*labelled.listing(), labelled.test_dir, labelled.gt_dir)


def is_loopback(host):
    """Whether `host` (an address or 'localhost') is this machine's loopback: nothing else reaches it."""
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def console_token(host, token):
    """The token the console requires -> (token or None, whether it was made here): --token; on an
    address other than loopback without one, a new random one (the console never serves the network
    unauthenticated); on loopback, none unless given."""
    if token or is_loopback(host):
        return token, False
    return secrets.token_urlsafe(24), True


def console_url(host, port, token):
    """The URL to open: the machine's name for an every-interface address (0.0.0.0, ::), the token in it."""
    shown = socket.gethostname() if host in ('0.0.0.0', '::', '') else f'[{host}]' if ':' in host else host
    return f'http://{shown}:{port}/' + (f'?token={urllib.parse.quote(token, safe="")}' if token else '')


def main(argv=None):
    args = parse_args(argv)
    detector = Detector.load(args.feat, model=args.model, method=args.method, model_dir=args.model_dir,
                             model_url=args.model_url, batch_size=args.batch_size)
    logger.info('loaded %s: %s %s, threshold %.4f (%s)', args.feat, detector.meta_.get('backbone'),
                detector.meta_.get('method'), detector.threshold_, detector.threshold_source_)
    labelled = labelled_set(args)
    token, made = console_token(args.host, args.token)
    default_outbox = os.path.splitext(args.feat)[0] + '.console.outbox'
    with publish.report_from_args(args, detector, 'console', default_outbox, with_metrics=True) as report:
        console = Console(detector, args.feat, args.data_root, labelled, report, args.by)
        if labelled is not None:
            threading.Thread(target=console.score_labelled, args=labelled[:2], daemon=True).start()
        app = create_app(console, token, args.max_upload_mb)
        if made:  # as Jupyter does: the URL that carries the token is the way in
            logger.warning('listening on %s without --token: every request needs the token made for this run; '
                           'open the console at %s', args.host, console_url(args.host, args.port, token))
        else:
            logger.info('console on %s', console_url(args.host, args.port, None) + ('?token=...' if token else ''))
        uvicorn.run(app, host=args.host, port=args.port, log_level='warning', server_header=False)


def run(argv=None):
    return cli.run_cli(main, 'web_app.py', argv)


if __name__ == '__main__':
    sys.exit(run())
