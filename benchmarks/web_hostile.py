"""Hostile requests against a running web console: what each one gets, and whether it still serves.

    python3 benchmarks/web_hostile.py --feat bottle.pkl

Starts `web_app.py` (a subprocess on a free loopback port, with a token and a data root holding
symlinks that point out of it), sends each request below, prints its status and error, then checks that
the server still answers, that nothing was written outside the feature file, and its peak memory.
"""
import argparse
import concurrent.futures
import os
import shutil
import socket
import sys
import tempfile
import time

import httpx2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.web_console import TOKEN, free_port, start_console  # noqa: E402
from tests.hostile import png_bomb  # noqa: E402

AUTH = {'Authorization': f'Bearer {TOKEN}'}
GOOD = os.path.join(REPO, 'images', 'good_000.png')


def raw(port, request, timeout=10):
    """Send raw bytes; -> the status line (or what happened)."""
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
            s.sendall(request)
            answer = s.recv(4096)
            return answer.split(b'\r\n')[0].decode(errors='replace') or 'connection closed, no answer'
    except OSError as e:
        return f'{type(e).__name__}: {e}'


def make_data_root(base):
    root, outside = os.path.join(base, 'root'), os.path.join(base, 'outside')
    os.makedirs(os.path.join(root, 'lot1'))
    os.makedirs(outside)
    shutil.copy(GOOD, os.path.join(root, 'lot1', 'good.png'))
    shutil.copy(GOOD, os.path.join(outside, 'secret.png'))
    os.symlink(outside, os.path.join(root, 'escape'))
    os.symlink(os.path.join(outside, 'secret.png'), os.path.join(root, 'lot1', 'link.png'))
    return root


def snapshot(folder):
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(folder) for f in fs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--feat', required=True)
    p.add_argument('--model_dir', default=os.path.join(REPO, 'models'))
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix='web_hostile_')
    feat = os.path.join(work, 'feat.pkl')
    shutil.copy(args.feat, feat)
    root = make_data_root(work)
    port = free_port()
    server = start_console(argparse.Namespace(feat=feat, model_dir=args.model_dir, images=root), port)
    url = f'http://127.0.0.1:{port}'
    c = httpx2.Client(base_url=url, timeout=60)
    before = snapshot(work) | snapshot(REPO)
    good = open(GOOD, 'rb').read()
    cases = [
        ('no token', lambda: c.get('/api/model')),
        ('wrong token', lambda: c.get('/api/model', headers={'Authorization': 'Bearer nope'})),
        ('token without "Bearer"', lambda: c.get('/api/model', headers={'Authorization': TOKEN})),
        ('token as ?token= on the API', lambda: c.get(f'/api/model?token={TOKEN}')),
        ('token in a cookie on the API', lambda: c.get('/api/model', headers={'Cookie': f'console_token={TOKEN}'})),
        ('dir=..', lambda: c.get('/api/images?dir=..', headers=AUTH)),
        ('dir=../../../../etc', lambda: c.get('/api/images?dir=../../../../etc', headers=AUTH)),
        ('dir=/etc (absolute)', lambda: c.get('/api/images?dir=/etc', headers=AUTH)),
        ('dir=lot1/../.. ', lambda: c.get('/api/images?dir=lot1/../..', headers=AUTH)),
        ('dir=escape (symlink out)', lambda: c.get('/api/images?dir=escape', headers=AUTH)),
        ('inspect escape/secret.png', lambda: c.get('/api/inspect?path=escape/secret.png', headers=AUTH)),
        ('inspect lot1/link.png (file symlink out)', lambda: c.get('/api/inspect?path=lot1/link.png', headers=AUTH)),
        ('inspect /etc/passwd', lambda: c.get('/api/inspect?path=/etc/passwd', headers=AUTH)),
        ('inspect with NUL byte', lambda: c.get('/api/inspect?path=lot1/good.png%00.txt', headers=AUTH)),
        ('folder dir=..', lambda: c.post('/api/folder', json={'dir': '..'}, headers=AUTH)),
        ('folder dir=escape', lambda: c.post('/api/folder', json={'dir': 'escape'}, headers=AUTH)),
        ('/static/../web_app.py', lambda: raw(port, b'GET /static/../web_app.py HTTP/1.1\r\nHost: x\r\n'
                                               b'Authorization: Bearer ' + TOKEN.encode() + b'\r\n\r\n')),
        ('/static/%2e%2e/web_app.py', lambda: c.get('/static/%2e%2e/web_app.py', headers=AUTH)),
        ('upload: text file named .png', lambda: c.post('/api/score', files={'file': ('x.png', b'hello', 'image/png')},
                                                        headers=AUTH)),
        ('upload: empty file', lambda: c.post('/api/score', files={'file': ('x.png', b'', 'image/png')}, headers=AUTH)),
        ('upload: truncated PNG', lambda: c.post('/api/score', files={'file': ('x.png', good[:len(good) // 2])},
                                                 headers=AUTH)),
        ('upload: filename ../../../tmp/evil.png', lambda: c.post('/api/score', headers=AUTH,
                                                                  files={'file': ('../../../tmp/evil.png', good)})),
        ('upload: filename <script>', lambda: c.post('/api/score', headers=AUTH,
                                                     files={'file': ('<img src=x onerror=alert(1)>.png', good)})),
        ('upload: 25 MiB (limit 20)', lambda: c.post('/api/score', headers=AUTH,
                                                     files={'file': ('big.png', b'\0' * (25 << 20))})),
        ('upload: 25 MiB chunked, no Content-Length', lambda: c.post(
            '/api/score', headers=dict(AUTH, **{'Content-Type': 'multipart/form-data; boundary=b'}),
            content=iter([b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n']
                         + [b'\0' * (1 << 20)] * 25))),
        ('upload: Content-Length: -1', lambda: raw(port, b'POST /api/score HTTP/1.1\r\nHost: x\r\nAuthorization: '
                                                   b'Bearer ' + TOKEN.encode() + b'\r\nContent-Length: -1\r\n\r\n')),
        ('upload: PNG bomb 30000 x 30000 px (~900 kB)', lambda: c.post('/api/score', headers=AUTH,
                                                                      files={'file': ('bomb.png', png_bomb(30000, 30000, 8, 0))})),
        ('upload: two files', lambda: c.post('/api/score', headers=AUTH,
                                             files=[('file', ('a.png', good)), ('file', ('b.png', good))])),
        ('upload: 1000 form fields', lambda: c.post('/api/score', headers=AUTH,
                                                    data={f'f{i}': 'x' for i in range(1000)})),
        ('upload: not multipart', lambda: c.post('/api/score', headers=AUTH, content=good)),
        ('upload: broken multipart', lambda: c.post('/api/score', content=b'--x\r\nbroken', headers=dict(
            AUTH, **{'Content-Type': 'multipart/form-data; boundary=x'}))),
        ('threshold: not JSON', lambda: c.post('/api/threshold', headers=AUTH, content=b'{threshold: 3')),
        ('threshold: NaN', lambda: c.post('/api/threshold', headers=AUTH, content=b'{"threshold": NaN}')),
        ('threshold: 1e999', lambda: c.post('/api/threshold', headers=AUTH, content=b'{"threshold": 1e999}')),
        ('threshold: "5"', lambda: c.post('/api/threshold', headers=AUTH, json={'threshold': '5'})),
        ('threshold: nested 50000 deep', lambda: c.post('/api/threshold', headers=AUTH, content=b'[' * 50000)),
        ('threshold: 1 MB body', lambda: c.post('/api/threshold', headers=AUTH, content=b' ' * (1 << 20))),
        ('header of 1 MB', lambda: raw(port, b'GET /api/model HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 1_000_000
                                         + b'\r\n\r\n')),
        ('10,000 headers', lambda: raw(port, b'GET /api/model HTTP/1.1\r\nHost: x\r\n'
                                       + b''.join(b'X-%d: y\r\n' % i for i in range(10_000)) + b'\r\n')),
        ('garbage request line', lambda: raw(port, b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' * 50 + b'\r\n\r\n')),
        ('HTTP/1.0 without Host', lambda: raw(port, b'GET /api/model HTTP/1.0\r\n\r\n')),
        ('TRACE /', lambda: c.request('TRACE', '/', headers=AUTH)),
        ('DELETE /api/model', lambda: c.delete('/api/model', headers=AUTH)),
        ('unknown route', lambda: c.get('/admin', headers=AUTH)),
    ]
    print(f'{"request":46s} answer')
    for name, send in cases:
        started = time.perf_counter()
        try:
            r = send()
            answer = r if isinstance(r, str) else f'{r.status_code} {r.text[:90]}'
        except httpx2.HTTPError as e:
            answer = f'{type(e).__name__}: {e}'
        print(f'{name:46s} {answer}  [{(time.perf_counter() - started) * 1e3:.0f} ms]')

    with concurrent.futures.ThreadPoolExecutor(20) as pool:  # 20 uploads at once
        codes = list(pool.map(lambda _: c.post('/api/score', files={'file': ('g.png', good)}, headers=AUTH).status_code,
                              range(20)))
    print(f'{"20 concurrent uploads":46s} {sorted(set(codes))}')
    alive = c.get('/api/model', headers=AUTH).status_code
    changed = sorted(path for path, mtime in (snapshot(work) | snapshot(REPO)).items()
                     if before.get(path) != mtime and '__pycache__' not in path)
    with open(f'/proc/{server.pid}/status') as f:
        peak = next(line.split()[1] for line in f if line.startswith('VmHWM'))
    server.terminate()
    server.wait(10)
    print(f'still serving afterwards: {alive == 200} ({alive}); files written: {changed or "none"}; '
          f'server peak memory {int(peak) // 1024} MiB')
    shutil.rmtree(work)


if __name__ == '__main__':
    main()
