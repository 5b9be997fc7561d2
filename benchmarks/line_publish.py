"""--watch telling the line over MQTT, with the broker stopped mid-run (issue 25's acceptance), in one run:

    python3 benchmarks/line_publish.py                  # bottle test images if ../shared has them, else images/
    python3 benchmarks/line_publish.py --images 200 --outage 20 --rate 5 --rounds 3

- outage: Debian's Mosquitto on a loopback port and a QoS 1 subscriber with a persistent session; a
  `--watch` process with `--publish mqtt://...` and `--metrics_port`; --images files are renamed into the
  watched folder at --rate per second, and the broker is stopped (SIGTERM) for --outage seconds in the
  middle, then started again. Counted: the distinct verdict messages the subscriber received (one per
  image is the target: none lost), duplicates, and, scraped from the metrics every 0.5 s, the largest
  outbox depth and unsent age.
- throughput: a watched folder filled with --images files before the watcher starts; images/s from its
  first JSON line to its last, with `--publish` (broker up) and without, alternated --rounds times
  (median of each), and their ratio (target >= 0.95).
Prints a table and one JSON line. Both watchers run with `--threshold` fixed and `--no_figures`.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
import mahalanobisad  # noqa: E402
from benchmarks.common import link_inputs, repeated  # noqa: E402
from detector import Detector  # noqa: E402
from tests.line_parts import Broker, Subscriber, free_port, wait_for  # noqa: E402

BOTTLE_TEST = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec', 'bottle', 'test')
TOPIC = 'line3/verdicts'


def watcher(common, folder, report, extra=()):
    return subprocess.Popen([sys.executable, 'mahalanobisad.py', '--watch', folder, '--json', report, *common,
                             *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def lines_in(report):
    if not os.path.exists(report):
        return 0
    with open(report) as f:
        return sum(1 for _ in f)


def verdict_lines(report):
    with open(report) as f:
        return sum('path' in json.loads(line) for line in f)


def stop(process):
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    return err


def images_per_s(common, sources, count, work, extra=()):
    """A watcher on a folder already holding `count` files -> images/s from its first JSON line to its last."""
    folder, report = tempfile.mkdtemp(dir=work), os.path.join(work, 'throughput.jsonl')
    link_inputs(repeated(sources, count), folder)
    if os.path.exists(report):
        os.remove(report)
    process = watcher(common, folder, report, extra)
    try:
        wait_for(lambda: lines_in(report) >= 1 or process.poll() is not None, 600, 'the first line')
        first = time.perf_counter()
        wait_for(lambda: lines_in(report) >= count or process.poll() is not None, 600, 'the last line')
        last = time.perf_counter()
    finally:
        stop(process)
    shutil.rmtree(folder)
    return (count - 1) / (last - first)


def scrape(port):
    """(outbox depth, unsent age) from the watcher's metrics, or None while it does not answer."""
    try:
        text = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=2).read().decode()
    except OSError:
        return None
    depth = sum(float(v) for v in re.findall(r'^mahalanobisad_outbox_depth\{[^}]*\} (\S+)$', text, re.M))
    age = re.search(r'^mahalanobisad_outbox_unsent_age_seconds (\S+)$', text, re.M)
    return depth, float(age.group(1)) if age else 0.0


def outage(common, sources, args, work):
    broker_dir, folder, staging = (os.path.join(work, name) for name in ('broker', 'incoming', 'staging'))
    for d in (broker_dir, folder, staging):
        os.makedirs(d)
    broker = Broker(broker_dir).start()
    subscriber = Subscriber(broker.port, TOPIC)
    metrics_port, report = free_port(), os.path.join(work, 'outage.jsonl')
    process = watcher(common, folder, report, ['--publish', f'mqtt://127.0.0.1:{broker.port}/{TOPIC}',
                                               '--outbox', os.path.join(work, 'line3.outbox'),
                                               '--metrics_port', str(metrics_port)])
    peaks, timeline = {'depth': 0.0, 'age': 0.0}, {}
    try:
        wait_for(lambda: scrape(metrics_port) is not None or process.poll() is not None, 600, 'the watcher')
        start, stop_at, restart_at = time.monotonic(), None, None
        down_from = args.images / args.rate / 2 - args.outage / 2  # the outage centred on the run
        for i, source in enumerate(repeated(sources, args.images)):
            wait_for(lambda: time.monotonic() >= start + i / args.rate, 60)
            staged = os.path.join(staging, f'{i:06d}.png')
            shutil.copy(source, staged)
            os.rename(staged, os.path.join(folder, f'{i:06d}.png'))
            elapsed = time.monotonic() - start
            if stop_at is None and elapsed >= down_from:
                broker.stop()
                stop_at = time.monotonic()
                timeline['broker_stopped_after_image'] = i
            if stop_at is not None and restart_at is None and time.monotonic() - stop_at >= args.outage:
                broker.start()
                restart_at = time.monotonic()
                timeline['broker_started_after_image'] = i
            if (sample := scrape(metrics_port)) is not None:
                peaks = {'depth': max(peaks['depth'], sample[0]), 'age': max(peaks['age'], sample[1])}
        timeline['broker_down_s'] = round(restart_at - stop_at, 1)

        def all_received():
            if (sample := scrape(metrics_port)) is not None:
                peaks.update(depth=max(peaks['depth'], sample[0]), age=max(peaks['age'], sample[1]))
            return len({m['id'] for m in subscriber.messages if m['type'] == 'verdict'}) >= args.images
        wait_for(all_received, 300, 'every verdict')
        timeline['all_received_s_after_restart'] = round(time.monotonic() - restart_at, 1)
        stop(process)
        wait_for(lambda: any(m['type'] == 'summary' for m in subscriber.messages), 30, 'the summary')
    finally:
        if process.poll() is None:
            process.kill()
        subscriber.close()
        broker.stop()
    verdicts = [m for m in subscriber.messages if m['type'] == 'verdict']
    return dict(timeline, images=args.images, verdicts_received=len(verdicts),
                distinct_verdicts=len({m['id'] for m in verdicts}),
                distinct_paths=len({m['path'] for m in verdicts}), json_verdict_lines=verdict_lines(report),
                peak_outbox_depth=int(peaks['depth']), peak_unsent_age_s=round(peaks['age'], 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--outage', type=float, default=20.0, help='seconds the broker is stopped')
    p.add_argument('--rate', type=float, default=5.0, help='images dropped per second in the outage test')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--model_dir', default='models')
    p.add_argument('--feat', default=None, help='a fitted feature file to use (copied); default: fit one on train/')
    args = p.parse_args()
    os.chdir(ROOT)
    sources = image_utils.list_images(BOTTLE_TEST if os.path.isdir(BOTTLE_TEST) else 'images')
    results = {'sources': BOTTLE_TEST if os.path.isdir(BOTTLE_TEST) else 'images', 'cpus': os.cpu_count(),
               'load_average_at_start': os.getloadavg()}
    with tempfile.TemporaryDirectory() as work:
        feat = os.path.join(work, 'train.pkl')
        if args.feat:
            shutil.copy(args.feat, feat)
        assert mahalanobisad.run(['-f', feat, '-i', 'images/good_000.png', '--no_figures',
                                  '--model_dir', args.model_dir]) == 0  # fits on train/ if needed
        threshold = Detector.load(feat, model_dir=args.model_dir).threshold_
        common = ['-f', feat, '--model_dir', args.model_dir, '-th', str(threshold), '--no_figures']

        results['outage'] = outage(common, sources, args, work)
        broker_dir = os.path.join(work, 'throughput_broker')
        os.makedirs(broker_dir)
        broker = Broker(broker_dir).start()
        subscriber = Subscriber(broker.port, TOPIC)
        publishing = ['--publish', f'mqtt://127.0.0.1:{broker.port}/{TOPIC}',
                      '--outbox', os.path.join(work, 'throughput.outbox')]
        plain, published = [], []
        try:
            for _ in range(args.rounds):
                plain.append(images_per_s(common, sources, args.images, work))
                published.append(images_per_s(common, sources, args.images, work, publishing))
        finally:
            subscriber.close()
            broker.stop()
        results['throughput'] = {'without_publish': [round(r, 2) for r in plain],
                                 'with_publish': [round(r, 2) for r in published],
                                 'ratio': round(statistics.median(published) / statistics.median(plain), 3)}
    results['load_average_at_end'] = os.getloadavg()
    o, t = results['outage'], results['throughput']
    print(f'outage: {o["images"]} images, broker down {o["broker_down_s"]} s (after image '
          f'{o["broker_stopped_after_image"]} to after image {o["broker_started_after_image"]}): '
          f'{o["distinct_verdicts"]} distinct verdicts received ({o["verdicts_received"]} with duplicates), '
          f'peak outbox depth {o["peak_outbox_depth"]}, peak unsent age {o["peak_unsent_age_s"]} s, all received '
          f'{o["all_received_s_after_restart"]} s after the restart')
    print(f'watch images/s: without --publish {statistics.median(plain):.2f}, with {statistics.median(published):.2f}'
          f': ratio {t["ratio"]} (target >= 0.95)')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
