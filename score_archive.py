"""Score an image archive on a Dask cluster: resumable, one JSON-lines file per shard, with exactly the
scores of mahalanobisad.py for the same feature file.

    python3 score_archive.py --feat line3.pkl --input /archive/2026/ --output scores/ --scheduler local:2
    python3 score_archive.py --feat line3.pkl --input manifest.txt --output scores/ --scheduler tcp://head:8786 --resume

The client only lists paths: it cuts the directory walk or the manifest into shards as it reads them and
keeps a bounded window of shard tasks in flight, so neither its memory nor the task graph grows with the
archive. Each worker reads its shards' images itself with one Detector, loaded once per worker process,
and writes part-NNNNNN.jsonl atomically: a task retried after its worker died rewrites the same file, and
--resume skips the shards whose file exists.
"""
import argparse
import collections
import contextlib
import glob
import importlib.util
import itertools
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid

from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.scheduler import KilledWorker
from tqdm import tqdm

import cli
import image_utils
from detector import Detector
from errors import ImageError, UsageError
from file_io import atomic_write_bytes, file_sha256

logger = logging.getLogger('score_archive')

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))

# Images per task, measured (docs/score_archive.md, benchmarks/archive_throughput.py): smaller shards pay the per-task
# pipeline start more often, larger ones lose more work to a dead worker and balance the last shards worse.
DEFAULT_SHARD_SIZE = 256
# Shard tasks in flight per worker thread: one running and one queued keeps every worker busy.
SHARDS_PER_THREAD = 2
JOB_FILE = '_JOB.json'
SUMMARY_FILE = '_SUMMARY.json'
PART_PATTERN = re.compile(r'part-\d{6,}\.jsonl')


def scheduler_argument(text):
    """'local:N' (N worker processes on this machine) or the address of a running scheduler."""
    if text.startswith('local:'):
        count = text[len('local:'):]
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f'local:N needs a positive number of workers, got {text}')
    elif not re.match(r'^[a-z]+://\S+$', text):
        raise argparse.ArgumentTypeError(f'expected local:N or a scheduler address like tcp://host:8786, got {text}')
    return text


def parse_args(argv=None):
    p = cli.OneLineArgumentParser(prog='score_archive.py', description=__doc__.split('\n\n')[0],
                                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--feat', required=True,
                   help='fitted feature file (with its stored thresholds), at a path every worker can read')
    p.add_argument('--input', required=True,
                   help='directory of images (searched recursively) or manifest file (one image path a line; '
                        'relative paths are relative to the current directory)')
    p.add_argument('--output', required=True, help='directory of part-NNNNNN.jsonl files and _SUMMARY.json')
    p.add_argument('--scheduler', type=scheduler_argument, default=f'local:{os.cpu_count() or 1}',
                   help='local:N starts N worker processes here (the cores shared out among them); '
                        'tcp://host:8786 connects to a running scheduler')
    p.add_argument('--shard_size', type=cli.positive_int, default=DEFAULT_SHARD_SIZE,
                   help='images per task')
    p.add_argument('--resume', action='store_true', help='skip the shards whose part file exists')
    p.add_argument('--dashboard', action='store_true', help='local:N only: serve the Dask dashboard on :8787 '
                                                            '(needs bokeh)')
    p.add_argument('--model_dir', default='models', help='cache of ONNX backbones, at a path every worker can use')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# input: a lazy listing, cut into shards
# ----------------------------------------------------------------------------------------------

def input_paths(given):
    """Yield the images of a directory (searched recursively, as mahalanobisad.py lists them) or the lines
    of a manifest (blank lines skipped), lazily, as the records will name them."""
    if os.path.isdir(given):
        yield from image_utils.walk_images(given)
        return
    if not os.path.isfile(given):
        raise ImageError(f'no such file or directory: {given}')
    if image_utils.is_image_file(given):
        raise UsageError(f'--input {given} is an image: give a directory or a manifest listing it')
    try:
        with open(given, encoding='utf-8') as manifest:
            for line in manifest:
                path = line.rstrip('\r\n')
                if path.strip():
                    yield path
    except UnicodeDecodeError as e:
        raise UsageError(f'manifest {given} is not UTF-8 text ({e.reason} at byte {e.start})') from None


def count_shards(given, shard_size):
    """Number of shards of a manifest (one quick pass that also checks it), or None for a directory (its
    walk is the work)."""
    if os.path.isdir(given):
        return None
    return -(-sum(1 for _ in input_paths(given)) // shard_size)


def shards(paths, shard_size):
    """Cut an iterable of paths into (index, [paths]) of shard_size paths, lazily."""
    paths = iter(paths)
    for index in itertools.count():
        shard = list(itertools.islice(paths, shard_size))
        if not shard:
            return
        yield index, shard


def part_path(output, index):
    return os.path.join(output, f'part-{index:06d}.jsonl')


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------

_detectors = {}  # per worker process: (feature file, model dir) -> Detector, loaded by its first shard
# One shard at a time per worker process, each using all of the worker's threads (its cores).
_shard_lock = threading.Lock()


def worker_detector(feat, model_dir):
    """This worker's Detector, loaded once, with the backbone and decoders on the worker's own threads."""
    key = (feat, model_dir)
    if key not in _detectors:
        os.environ[image_utils.THREADS_ENV] = str(get_worker().state.nthreads)
        _detectors[key] = Detector.load(feat, model_dir=model_dir)
    return _detectors[key]


def score_shard(index, paths, base, feat, model_dir, output):
    """Score one shard on a worker and write its part file atomically -> (images, anomalies, failures).

    paths: as the records name them; read relative to `base` (the client's directory). An unreadable
    image becomes a record with `error` (score and anomaly null).
    """
    with _shard_lock:
        detector = worker_detector(feat, model_dir)
        lines, anomalies, failures = [], 0, 0
        for path, result in zip(paths, detector.inspect([os.path.join(base, p) for p in paths], desc=None)):
            record = {'path': path, 'score': result.score,
                      'anomaly': result.anomaly}
            if result.error is not None:
                record['error'] = result.error
                failures += 1
            anomalies += bool(result.anomaly)
            lines.append(json.dumps(record) + '\n')
        atomic_write_bytes(part_path(output, index), ''.join(lines).encode())
    return len(lines), anomalies, failures


# ----------------------------------------------------------------------------------------------
# client side
# ----------------------------------------------------------------------------------------------

def prepare_output(output, job, resume):
    """Check that `output` may take this job's parts and record the job in it: without --resume it must
    hold no parts; with --resume, its parts must come from the same input, feature file and shard size."""
    job_file = os.path.join(output, JOB_FILE)
    has_parts = os.path.isdir(output) and any(PART_PATTERN.fullmatch(f) for f in os.listdir(output))
    if has_parts and not resume:
        raise UsageError(f'{output} holds parts of an earlier run: pass --resume to complete it, '
                         f'or choose another --output')
    if resume and os.path.exists(job_file):
        with open(job_file) as f:
            earlier = json.load(f)
        differences = [f'{k} {earlier.get(k)!r} now {job[k]!r}' for k in job if earlier.get(k) != job[k]]
        if differences:
            raise UsageError(f'cannot resume {output}: its parts were made with other settings '
                             f'({"; ".join(differences)}); choose another --output')
    atomic_write_bytes(job_file, json.dumps(job, indent=1).encode())


def read_part_counts(path):
    """(images, anomalies, failures) of a part file written earlier."""
    images = anomalies = failures = 0
    try:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                images += 1
                anomalies += record['anomaly'] is True
                failures += 'error' in record
    except (ValueError, KeyError) as e:
        raise UsageError(f'cannot resume from {path}: not a part file ({e}); delete it to rescore its shard')
    return images, anomalies, failures


@contextlib.contextmanager
def connect(scheduler, dashboard):
    """A Client of the cluster `scheduler` names; a local one is started here and stopped at the end."""
    if not scheduler.startswith('local:'):
        with Client(scheduler) as client:
            yield client
        return
    workers = int(scheduler[len('local:'):])
    # Without the dashboard the scheduler still serves its health routes: on loopback, on any free port.
    with LocalCluster(n_workers=workers, threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
                      processes=True, host='127.0.0.1', dashboard_address='127.0.0.1:' + ('8787' if dashboard else '0'),
                      scheduler_kwargs={'dashboard': dashboard}, local_directory=tempfile.gettempdir(),
                      silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client


def check_cluster_imports(client):
    """A one-line error, not a deserialization traceback, where the scheduler or a worker cannot import this
    tool: they read the shard task by its module's name."""
    found = {'scheduler': client.run_on_scheduler(importlib.util.find_spec, __name__),
             **client.run(importlib.util.find_spec, __name__)}
    missing = [where for where, spec in found.items() if spec is None]
    if missing:
        raise UsageError(f'{", ".join(missing)} cannot import {__name__}: start dask scheduler and dask worker '
                         f'with PYTHONPATH={PROJECT_DIR} (docs/score_archive.md)')


def run_shards(client, shard_iter, task_args, output, resume, progress):
    """Submit the shards through a bounded window of futures, skipping existing parts if `resume`
    -> Counter(images, anomalies, failures, shards, resumed, scored)."""
    totals = collections.Counter()
    window = as_completed()
    run_id = uuid.uuid4().hex[:8]

    def collect(future):
        try:
            images, anomalies, failures = future.result()
        except KilledWorker as e:
            raise OSError(f'shard task {future.key} failed: the workers running it died ({e})') from None
        totals.update(images=images, anomalies=anomalies, failures=failures, scored=images)
        progress.update()

    for index, paths in shard_iter:
        totals['shards'] += 1
        part = part_path(output, index)
        if resume and os.path.exists(part):
            images, anomalies, failures = read_part_counts(part)
            totals.update(images=images, anomalies=anomalies, failures=failures, resumed=1)
            progress.update()
            continue
        while window.count() >= SHARDS_PER_THREAD * max(1, sum(client.nthreads().values())):
            collect(next(window))
        window.add(client.submit(score_shard, index, paths, *task_args, key=f'shard-{index:06d}-{run_id}',
                                 pure=False))
    for future in window:
        collect(future)
    return totals


def remove_stale_temporaries(output):
    """Temporary part files left by workers killed while writing (their shards were rewritten since)."""
    for path in glob.glob(os.path.join(output, '.part-*.tmp')):
        with contextlib.suppress(OSError):
            os.unlink(path)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    feat, output = os.path.abspath(args.feat), os.path.abspath(args.output)
    detector = Detector.load(feat, model_dir=args.model_dir)  # checks the file before any worker starts
    logger.info('%s %s from %s: threshold %.3f (%s)', detector.meta_['backbone'], detector.meta_['method'],
                args.feat, detector.threshold_, detector.threshold_source_)
    total_shards = count_shards(args.input, args.shard_size)  # a bad input fails here, before the cluster starts
    if total_shards == 0:
        raise ImageError(f'no image paths listed in {args.input}')
    job = {'input': os.path.abspath(args.input), 'feat': feat, 'feat_sha256': file_sha256(feat),
           'shard_size': args.shard_size}
    prepare_output(output, job, args.resume)
    task_args = (os.getcwd(), feat, os.path.abspath(args.model_dir), output)

    with connect(args.scheduler, args.dashboard) as client:
        check_cluster_imports(client)
        threads = client.nthreads()
        logger.info('cluster %s: %d workers, %d threads; shards of %d images from %s -> %s', args.scheduler,
                    len(threads), sum(threads.values()), args.shard_size, args.input, args.output)
        with tqdm(total=total_shards, desc='shards', unit='shard') as progress:
            totals = run_shards(client, shards(input_paths(args.input), args.shard_size), task_args, output,
                                args.resume, progress)
    remove_stale_temporaries(output)
    if not totals['images']:
        raise ImageError(f'no images ({", ".join(image_utils.IMAGE_EXTENSIONS)}) found in {args.input}')

    wall = time.perf_counter() - start
    summary = {'images': totals['images'], 'anomalies': totals['anomalies'], 'failures': totals['failures'],
               'shards': totals['shards'], 'shards_resumed': totals['resumed'], 'images_scored': totals['scored'],
               'wall_s': round(wall, 3), 'images_per_s': round(totals['scored'] / wall, 2),
               'threshold': detector.threshold_, 'threshold_source': detector.threshold_source_,
               'feat': feat, 'input': job['input'], 'scheduler': args.scheduler, 'shard_size': args.shard_size}
    atomic_write_bytes(os.path.join(output, SUMMARY_FILE), json.dumps(summary, indent=1).encode())
    logger.info('%d images (%d anomalous, %d unreadable) in %d shards (%d resumed); scored %d in %.1f s: '
                '%.1f images/s; wrote %s', totals['images'], totals['anomalies'], totals['failures'],
                totals['shards'], totals['resumed'], totals['scored'], wall, summary['images_per_s'],
                os.path.join(args.output, SUMMARY_FILE))
    return summary


def run(argv=None):
    logging.getLogger('distributed').setLevel(logging.WARNING)  # its INFO lines are the cluster's plumbing
    return cli.run_cli(main, 'score_archive.py', argv)


if __name__ == '__main__':
    # Workers import score_shard by its module's name: run it from `score_archive`, not from `__main__`.
    import score_archive
    raise SystemExit(score_archive.run())
