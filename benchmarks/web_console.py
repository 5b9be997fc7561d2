"""Speed of the web console: POST /api/score latency and the page's load time in headless Chromium.

    python3 benchmarks/web_console.py --feat bottle.pkl --images ../shared/data/mvtec/bottle/test

Starts `web_app.py` as a user would (a subprocess on a free loopback port, with a token), sends
--requests uploads of the images one after the other (after one warm-up request), and reports the
median and 95th percentile of the server-side time (the Server-Timing header: form parsing, decoding,
scoring, figure and PNG encoding) and of the client's round trip, against a baseline measured in the
same run: Detector.inspect of the same images one at a time, in-process (decoding and scoring only). Then opens the page in Debian's
Chromium with Playwright and reports the navigation's load event and the time until the page is ready
(model card and threshold histogram drawn); --screenshot also uploads four sample images (images/)
and saves the page.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import image_utils  # noqa: E402

TOKEN = 'benchmark'
SCREENSHOT_IMAGES = ('good_000.png', 'broken_small_000.png', 'contamination_005.png', 'broken_large_000.png')
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_console(args, port):
    command = [sys.executable, os.path.join(REPO, 'web_app.py'), '--feat', args.feat, '--port', str(port),
               '--token', TOKEN, '--model_dir', args.model_dir, '--data_root', args.images]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit('web_app.py exited: ' + server.stderr.read().decode()[-2000:])
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit('web_app.py did not start within 120 s')


def percentiles(values):
    return statistics.median(values), statistics.quantiles(values, n=20)[-1]  # median, 95th percentile


def measure_scoring(url, paths, count):
    headers = {'Authorization': f'Bearer {TOKEN}'}
    server_ms, round_trip_ms = [], []
    with httpx2.Client(base_url=url, headers=headers, timeout=60) as client:
        for i in range(count + 1):
            path = paths[i % len(paths)]
            with open(path, 'rb') as f:
                data = f.read()
            started = time.perf_counter()
            response = client.post('/api/score', files={'file': (os.path.basename(path), data, 'image/png')})
            elapsed = (time.perf_counter() - started) * 1e3
            response.raise_for_status()
            if i == 0:
                continue  # warm-up: first-call allocations
            round_trip_ms.append(elapsed)
            server_ms.append(float(response.headers['server-timing'].split('dur=')[1]))
    return server_ms, round_trip_ms


def measure_inspect_alone(args, paths, count):
    """The baseline, in this process while the server idles: decoding and scoring one image at a time
    with Detector.inspect (what /api/score does before drawing the figure), ms per image."""
    from mahalanobisad import Detector
    detector = Detector.load(args.feat, model_dir=args.model_dir)
    times = []
    for i in range(count + 1):
        started = time.perf_counter()
        next(detector.inspect([paths[i % len(paths)]], desc=None))
        times.append((time.perf_counter() - started) * 1e3)
    return times[1:]


def measure_page(url, screenshot, paths, loads=5):
    from playwright.sync_api import sync_playwright
    load_ms, ready_ms = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path='/usr/bin/chromium', headless=True, args=CHROMIUM_FLAGS)
        try:
            for _ in range(loads):  # a fresh context each time: nothing cached
                context = browser.new_context(viewport={'width': 1400, 'height': 1000})
                page = context.new_page()
                started = time.perf_counter()
                page.goto(f'{url}/?token={TOKEN}')
                page.wait_for_selector('body[data-ready=true]', timeout=60_000)
                ready_ms.append((time.perf_counter() - started) * 1e3)
                load_ms.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
                if screenshot and len(ready_ms) == loads:
                    page.set_input_files('#file-input', paths)
                    page.wait_for_selector(f'#result-rows tr:nth-child({len(paths)})', timeout=60_000)
                    page.click('#result-rows tr:first-child')  # the highest score (sorted descending)
                    page.wait_for_selector('#figure:not([hidden])')
                    page.wait_for_timeout(300)
                    page.screenshot(path=screenshot, full_page=True)
                context.close()
        finally:
            browser.close()
    return load_ms, ready_ms


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--feat', required=True, help='feature file fitted by mahalanobisad.py')
    p.add_argument('--images', default=os.path.join(os.path.dirname(REPO), 'shared', 'data', 'mvtec', 'bottle', 'test'))
    p.add_argument('--requests', type=int, default=50)
    p.add_argument('--model_dir', default=os.path.join(REPO, 'models'))
    p.add_argument('--screenshot', default=None, help='save a screenshot of the page with a few results here')
    args = p.parse_args()
    paths = image_utils.list_images(args.images)
    port = free_port()
    server = start_console(args, port)
    url = f'http://127.0.0.1:{port}'
    try:
        server_ms, round_trip_ms = measure_scoring(url, paths, args.requests)
        alone_ms = measure_inspect_alone(args, paths, args.requests)
        shots = [os.path.join(REPO, 'images', name) for name in SCREENSHOT_IMAGES]
        load_ms, ready_ms = measure_page(url, args.screenshot, shots)
    finally:
        server.terminate()
        server.wait(10)
    print(f'POST /api/score, {args.requests} requests of {args.images} (after 1 warm-up), ms:')
    print('  server side (Server-Timing): median %.1f  p95 %.1f' % percentiles(server_ms))
    print('  client round trip:           median %.1f  p95 %.1f' % percentiles(round_trip_ms))
    print('  baseline, Detector.inspect of one image in-process (no figure, no HTTP): median %.1f  p95 %.1f'
          % percentiles(alone_ms))
    print(f'page in headless Chromium, {len(load_ms)} fresh loads, ms:')
    print('  load event:                  median %.1f  max %.1f' % (statistics.median(load_ms), max(load_ms)))
    print('  ready (card + histogram):    median %.1f  max %.1f' % (statistics.median(ready_ms), max(ready_ms)))


if __name__ == '__main__':
    main()
