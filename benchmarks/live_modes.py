"""Live modes measured against their baselines, in one run (issue 10's acceptance figures):

    python3 benchmarks/live_modes.py                 # bottle test images if ../shared has them, else images/
    python3 benchmarks/live_modes.py --frames 200 --long_frames 2000 --files 20

- video vs images: `-v` on an mp4 of N frames against `-i` on the same N frames saved as PNG files
  (the frames the video decodes to), figures off and `--threshold` given in both, in-process, each timed
  from argument parsing to the last verdict, alternated --rounds times (median of each);
- memory: peak RSS of the whole process (ru_maxrss) running `-v` with the annotated video on, on
  --long_frames against --frames frames (fresh processes);
- watch latency: a `--watch` process on an empty folder; files are dropped in one at a time (renamed in
  from beside the folder, and written in place), and the time from the file being complete (rename done,
  or file closed) to its JSON line is measured; compared with 0.3 s + one image's scoring time (in-process,
  warm, median of 10);
- stored threshold: a single-image run in a fresh process with the thresholds stored in the feature file
  for the labelled set (images/ + gt_masks/) against the same run with --threshold (median of --rounds).
Prints a table and one JSON line.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
import mahalanobisad  # noqa: E402
from detector import Detector  # noqa: E402

BOTTLE_TEST = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec', 'bottle', 'test')


def make_video(path, sources, count, size=None):
    """An mp4 (mp4v) of `count` frames cycling through `sources`; size (w, h) or the first image's."""
    first = cv2.imread(sources[0])
    size = size or first.shape[1::-1]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 25, size)
    for i in range(count):
        writer.write(cv2.resize(cv2.imread(sources[i % len(sources)]), size, interpolation=cv2.INTER_AREA))
    writer.release()


def frames_as_png(video, folder):
    """The video's decoded frames as lossless PNG files: the same pixels as `-v` scores."""
    capture, paths = cv2.VideoCapture(video), []
    while (frame := capture.read())[0]:
        paths.append(os.path.join(folder, f'{len(paths):06d}.png'))
        cv2.imwrite(paths[-1], frame[1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return paths


def timed_run(argv):
    start = time.perf_counter()
    assert mahalanobisad.run(argv) == 0, argv
    return time.perf_counter() - start


def video_vs_images(common, video, png_dir, count, rounds, work):
    video_s, image_s = [], []
    for _ in range(rounds):
        image_s.append(timed_run(common + ['-i', png_dir, '--json', os.path.join(work, 'i.json')]))
        video_s.append(timed_run(common + ['-v', video, '--json', os.path.join(work, 'v.jsonl')]))
    video_fps, image_fps = count / statistics.median(video_s), count / statistics.median(image_s)
    return {'video_fps': round(video_fps, 2), 'image_fps': round(image_fps, 2),
            'ratio': round(video_fps / image_fps, 3)}


def peak_rss_mib(argv):
    code = ('import resource, sys; sys.path.insert(0, sys.argv[1]); import mahalanobisad; '
            'assert mahalanobisad.run(sys.argv[2:]) == 0; '
            'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)')
    out = subprocess.run([sys.executable, '-c', code, ROOT] + argv, cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    return int(out.split()[-1]) / 1024


def follow(report, count, timeout=120):
    """The JSON lines of `report` once there are `count`, and the time they were seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(report):
            with open(report) as f:
                lines = f.readlines()
            if len(lines) >= count:
                return lines, time.perf_counter()
        time.sleep(0.002)
    raise RuntimeError(f'watch mode wrote no line {count} in {timeout} s')


def watch_latency(common, sources, files, work):
    incoming, staging = os.path.join(work, 'incoming'), os.path.join(work, 'staging')
    report = os.path.join(work, 'w.jsonl')
    os.makedirs(incoming)
    os.makedirs(staging)
    process = subprocess.Popen([sys.executable, 'mahalanobisad.py', '--watch', incoming, '--json', report,
                                '--no_figures'] + common, cwd=ROOT, stderr=subprocess.DEVNULL)
    latencies = {'rename': [], 'write': []}
    try:
        shutil.copy(sources[0], os.path.join(incoming, 'warmup.png'))
        follow(report, 1, timeout=600)
        for i in range(files):
            how = 'rename' if i % 2 == 0 else 'write'
            target = os.path.join(incoming, f'{i:04d}.png')
            data = open(sources[i % len(sources)], 'rb').read()
            if how == 'rename':
                staged = os.path.join(staging, 'part.png')
                with open(staged, 'wb') as f:
                    f.write(data)
                os.rename(staged, target)
            else:
                with open(target, 'wb') as f:
                    f.write(data)
            complete = time.perf_counter()
            _, seen = follow(report, i + 2)
            latencies[how].append(seen - complete)
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {how: round(statistics.median(values), 3) for how, values in latencies.items()}


def single_image_scoring_s(feat, model_dir, path):
    detector = Detector.load(feat, model_dir=model_dir)
    detector.decision_function([path])  # warm-up
    times = []
    for _ in range(10):
        start = time.perf_counter()
        detector.decision_function([path])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def process_seconds(argv):
    start = time.perf_counter()
    subprocess.run([sys.executable, 'mahalanobisad.py'] + argv, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--frames', type=int, default=200, help='frames of the speed test and the short video')
    p.add_argument('--long_frames', type=int, default=2000, help='frames of the long video (memory)')
    p.add_argument('--memory_size', type=int, default=448, help='frame side of the memory test videos, px')
    p.add_argument('--files', type=int, default=20, help='files dropped into the watched folder')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--model_dir', default='models')
    p.add_argument('--feat', default=None,
                   help='a fitted feature file to use (copied); default: fit one on train/ (minutes on a busy machine)')
    args = p.parse_args()
    os.chdir(ROOT)
    sources = image_utils.list_images(BOTTLE_TEST if os.path.isdir(BOTTLE_TEST) else 'images')
    results = {'sources': BOTTLE_TEST if os.path.isdir(BOTTLE_TEST) else 'images', 'cpus': os.cpu_count()}
    with tempfile.TemporaryDirectory() as work:
        feat = os.path.join(work, 'train.pkl')
        if args.feat:
            shutil.copy(args.feat, feat)
        assert mahalanobisad.run(['-f', feat, '-i', 'images/good_000.png', '--no_figures',
                                  '--model_dir', args.model_dir]) == 0  # fits on train/ if needed, stores thresholds
        threshold = Detector.load(feat, model_dir=args.model_dir).threshold_
        common = ['-f', feat, '--model_dir', args.model_dir]
        fixed = common + ['-th', str(threshold), '--no_figures']

        video, png_dir = os.path.join(work, 'frames.mp4'), os.path.join(work, 'frames')
        os.makedirs(png_dir)
        make_video(video, sources, args.frames)
        frames_as_png(video, png_dir)
        timed_run(fixed + ['-i', sources[0]])  # warm-up: the backbone opens once per process
        results['speed'] = video_vs_images(fixed, video, png_dir, args.frames, args.rounds, work)

        memory = {}
        for count in (args.frames, args.long_frames):
            clip = os.path.join(work, f'memory_{count}.mp4')
            make_video(clip, sources, count, (args.memory_size, args.memory_size))
            memory[count] = round(peak_rss_mib(common + ['-th', str(threshold), '-v', clip,
                                                         '-s', os.path.join(work, f'out_{count}.mp4')]), 1)
            os.remove(clip)
        results['memory_mib'] = dict(memory, ratio=round(memory[args.long_frames] / memory[args.frames], 3))

        scoring = single_image_scoring_s(feat, args.model_dir, sources[0])
        latency = watch_latency(common, sources, args.files, work)
        results['watch'] = dict(median_latency_s=latency, one_image_scoring_s=round(scoring, 3),
                                bound_s=round(0.3 + scoring, 3))

        stored, given = [], []
        single = common + ['-i', sources[0], '--no_figures']
        for _ in range(args.rounds):
            stored.append(process_seconds(single))
            given.append(process_seconds(single + ['-th', str(threshold)]))
        results['single_image_s'] = {'stored': round(statistics.median(stored), 3),
                                     'threshold_given': round(statistics.median(given), 3),
                                     'ratio': round(statistics.median(stored) / statistics.median(given), 3)}

    speed, memory, watch, single = (results['speed'], results['memory_mib'], results['watch'],
                                    results['single_image_s'])
    print(f'video {speed["video_fps"]} frames/s vs images {speed["image_fps"]} images/s: ratio {speed["ratio"]} '
          f'(target >= 0.8)')
    print(f'peak RSS {memory[args.frames]} MiB ({args.frames} frames) vs {memory[args.long_frames]} MiB '
          f'({args.long_frames} frames): ratio {memory["ratio"]} (target <= 1.2)')
    print(f'watch: complete -> JSON line, median {watch["median_latency_s"]} s; bound 0.3 s + scoring '
          f'{watch["one_image_scoring_s"]} s = {watch["bound_s"]} s')
    print(f'single image, stored threshold {single["stored"]} s vs --threshold {single["threshold_given"]} s: '
          f'ratio {single["ratio"]} (target <= 1.2)')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
