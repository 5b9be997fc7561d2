"""Live inspection over detector.Detector: video files, image sequences and cameras (-v), watched folders (--watch).

A video source is read on its own thread, so decoding the next frames overlaps scoring, and memory
is bounded by a short queue, never by the length of the video. Frames are RGB arrays given to
Detector.inspect, the same pipeline as image files. Results go to JSON Lines (one object per line,
flushed as produced, so another program can follow the file) and to an annotated video
(plot_utils.render_live_frame), rendered and encoded on a background thread.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import statistics
import threading
import time
import queue

import cv2
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: completeness of a watched file is judged by its size and time alone
    fcntl = None

import image_utils
import plot_utils
import publish
from errors import ImageError, UsageError
from file_io import fit_path

logger = logging.getLogger('mahalanobisad')

DEFAULT_FPS = 25.0          # for sources that report no frame rate (image sequences, some cameras)
READ_AHEAD = 32             # frames decoded ahead of scoring: memory is this many full-size frames
VIDEO_CODECS = {'.mp4': 'mp4v', '.m4v': 'mp4v', '.mov': 'mp4v', '.mkv': 'mp4v', '.avi': 'MJPG'}
LATENCY_WINDOW = 10_000     # latency statistics over the last this many frames (a camera runs for days)
LOG_EVERY_S = 5.0           # progress line of a live source
WATCH_POLL_S = 0.05         # folder scan interval
WATCH_SETTLE_S = 0.2        # a watched file unchanged this long (and not open for writing) is complete


@dataclasses.dataclass
class Frame:
    """index: position in the source (skipped frames count); time_s: source time, index / fps for a file,
    seconds since the first frame for a camera; image: RGB uint8 (H, W, 3); captured: time.monotonic()
    when it was read."""
    index: int
    time_s: float
    image: np.ndarray
    captured: float


class VideoSource:
    """`-v SRC` opened with OpenCV: a camera index ('0'), an image-sequence pattern ('frames/%04d.png')
    or a video file (whatever OpenCV's FFmpeg backend reads). ImageError if it cannot be opened or
    gives no frame. Attributes: camera (bool), fps, frame_count (None when unknown)."""

    def __init__(self, spec):
        self.spec, self.camera = spec, spec.strip().isdigit()
        if not self.camera and '%' not in spec and not os.path.isfile(spec):
            raise ImageError(f'no such video file: {spec}')
        # FFmpeg's own messages (read once, at its first use) would add lines to our one-line error.
        os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '8')  # AV_LOG_FATAL
        quiet = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # our one line says it instead
        try:
            self.capture = (cv2.VideoCapture(int(spec)) if self.camera else
                            cv2.VideoCapture(spec, cv2.CAP_IMAGES) if '%' in spec else cv2.VideoCapture(spec))
            ok, self._first = self.capture.read() if self.capture.isOpened() else (False, None)
        finally:
            cv2.utils.logging.setLogLevel(quiet)
        if not ok:
            self.capture.release()
            raise ImageError(f'cannot open camera {spec}' if self.camera else
                             f'cannot read {spec}: not a video or image sequence OpenCV can decode')
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if np.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS
        count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frame_count = count if count > 0 and not self.camera else None
        self._next_index, self._start = 0, None

    def read(self):
        """The next Frame, or None at the end."""
        if self._first is not None:
            image, self._first = self._first, None
        else:
            ok, image = self.capture.read()
            if not ok:
                return None
        captured = time.monotonic()
        self._start = self._start if self._start is not None else captured
        index, self._next_index = self._next_index, self._next_index + 1
        time_s = captured - self._start if self.camera else index / self.fps
        return Frame(index, time_s, cv2.cvtColor(image, cv2.COLOR_BGR2RGB), captured)

    def release(self):
        self.capture.release()


class _ReaderThread:
    """Runs `deliver(read())` (read returns a Frame, or None at the end) on a daemon thread, from start()
    until the end or stop(); an error of read() is kept in `error` and ends the frames (None)."""

    def __init__(self, read, deliver):
        self.stopped = threading.Event()
        self.error = None
        self._read, self._deliver = read, deliver
        self._thread = threading.Thread(target=self._run, name='video reader', daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        try:
            while not self.stopped.is_set():
                frame = self._read()
                self._deliver(frame)
                if frame is None:
                    return
        except Exception as e:  # handed to the consumer, raised there
            self.error = e
            self._deliver(None)

    def stop(self):
        self.stopped.set()
        self._thread.join()


def read_ahead(source, depth=READ_AHEAD):
    """Frames of `source` in order, decoded on a thread up to `depth` frames ahead (a generator)."""
    frames = queue.Queue(depth)

    def deliver(frame):
        while not reader.stopped.is_set():
            try:
                return frames.put(frame, timeout=0.1)
            except queue.Full:
                pass

    reader = _ReaderThread(source.read, deliver)
    reader.start()
    try:
        while (frame := frames.get()) is not None:
            yield frame
        if reader.error:
            raise reader.error
    finally:
        reader.stop()


class NewestFrames:
    """Iterate to get the newest frame of `source` not given yet: it is read continuously on a thread,
    and a frame replaced by a newer one before it was taken counts in `skipped`. So a consumer slower
    than the source never falls behind it. A file (not a camera) is delivered at its frame rate, as
    its camera would have."""

    def __init__(self, source):
        self.source, self.skipped = source, 0
        self._latest, self._ended = None, False
        self._changed = threading.Condition()
        self._t0 = time.monotonic()
        self._reader = _ReaderThread(self._read, self._deliver)
        self._reader.start()

    def _read(self):
        frame = self.source.read()
        if frame is not None and not self.source.camera:
            self._reader.stopped.wait(max(0.0, self._t0 + frame.time_s - time.monotonic()))
            frame.captured = time.monotonic()
        return frame

    def _deliver(self, frame):
        with self._changed:
            if frame is None:
                self._ended = True
            else:
                self.skipped += self._latest is not None
                self._latest = frame
            self._changed.notify()

    def __iter__(self):
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._latest is not None or self._ended)
                frame, self._latest = self._latest, None
            if frame is None:
                if self._reader.error:
                    raise self._reader.error
                return
            yield frame

    def close(self):
        self._reader.stop()


class JsonLines:
    """Writes one JSON object per line to `path` (nothing if None), flushed line by line."""

    def __init__(self, path):
        self.file = open(path, 'w', encoding='utf-8') if path else None

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


class AnnotatedVideo:
    """The annotated video (plot_utils.render_live_frame per frame) at `fps`, rendered and encoded in
    order on a background thread, at most `max_pending` frames queued. Written under a temporary name
    beside `path` and renamed into place by close(), so `path` is never a half-written video."""

    def __init__(self, path, fps, max_pending=32):
        stem, ext = os.path.splitext(path)
        if ext.lower() not in VIDEO_CODECS:
            raise UsageError(f'--savepath {path}: an annotated video needs one of {", ".join(VIDEO_CODECS)}')
        self.path, self.partial, self.frames = path, f'{stem}.partial{ext}', 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.writer = cv2.VideoWriter(self.partial, cv2.VideoWriter_fourcc(*VIDEO_CODECS[ext.lower()]), fps,
                                      plot_utils.LIVE_SIZE)
        if not self.writer.isOpened():
            raise UsageError(f'cannot write video {path} (no {ext} encoder in this OpenCV)')
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='video writer')
        self.slots = threading.BoundedSemaphore(max_pending)
        self.error = None

    def submit(self, *render_args):
        """Queue one frame: the arguments of plot_utils.render_live_frame."""
        if self.error:
            raise self.error
        self.slots.acquire()
        self.pool.submit(self._write, render_args).add_done_callback(lambda _: self.slots.release())

    def _write(self, render_args):
        try:
            self.writer.write(plot_utils.render_live_frame(*render_args))
            self.frames += 1
        except Exception as e:  # raised on the next submit, or by close
            self.error = self.error or e

    def close(self, keep=True):
        """Finish the file: renamed into `path` if keep and it has frames, else removed."""
        self.pool.shutdown(wait=True)
        self.writer.release()
        if keep and self.frames and not self.error:
            os.replace(self.partial, self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.partial)
        if self.error:
            raise self.error


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does: both end a live run cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Tally:
    """Counts, rate and latency of a live run, for the progress lines and the summary."""

    def __init__(self):
        self.start = self.last_log = time.monotonic()
        self.scored = self.anomalous = self.unreadable = 0
        self.latencies = collections.deque(maxlen=LATENCY_WINDOW)

    def add(self, anomalous, latency=None):
        self.scored += 1
        self.anomalous += bool(anomalous)
        if latency is not None:
            self.latencies.append(latency)

    def rate(self):
        return self.scored / max(time.monotonic() - self.start, 1e-9)

    def latency(self):
        """{'median', 'max'} capture-to-verdict seconds, or None."""
        if not self.latencies:
            return None
        return {'median': round(statistics.median(self.latencies), 4), 'max': round(max(self.latencies), 4)}

    def due(self):
        now = time.monotonic()
        if now - self.last_log < LOG_EVERY_S:
            return False
        self.last_log = now
        return True


def _base_summary(detector, tally, interrupted, report):
    return {'anomalous': tally.anomalous, 'drifted': report.drifted, 'seconds': round(time.monotonic() - tally.start, 3),
            'threshold': detector.threshold_, 'threshold_source': detector.threshold_source_,
            'pixel_threshold': detector.pixel_threshold_, 'interrupted': interrupted}


def _tell_the_line(report, records, result, latency=None, **where):
    """A scored image to the LineReport (message, metrics, drift and score-shift windows); a warning it
    raises (or its end) also becomes a JSON line {"drift": {...}} or {"score_shift": {...}}."""
    for record in report.scored(result, latency, **where):
        records.write(record)


def inspect_video(detector, spec, realtime=False, savepath=None, json_path=None, report=None):
    """-v: score a video file or image sequence frame by frame, or (a camera, or realtime) the newest
    frame of a live source -> the summary dict.

    Writes a JSON line per scored frame {frame, time_s, score, anomaly, conditions[, latency_s]}, the
    drift and score-shift warnings ({"drift": {...}}, {"score_shift": {...}}) and a last line {"summary": {...}} to json_path, and an annotated
    frame per scored frame to the video savepath (None: no video); tells `report` (a
    publish.LineReport: messages, metrics; default one that only watches the conditions) of each
    frame. Runs to the end of the source, or until Ctrl-C / SIGTERM (then the outputs are finished as
    they are and the summary says interrupted).
    """
    report = report or publish.LineReport(detector, f'video:{spec}')
    source = VideoSource(spec)
    live = realtime or source.camera
    tally, interrupted, video, newest, frames, results = _Tally(), False, None, None, None, None
    records = JsonLines(json_path)
    try:
        video = AnnotatedVideo(savepath, source.fps) if savepath else None
        logger.info('scoring %s%s at %.1f frames/s%s (threshold %.3f from %s)', 'camera ' if source.camera else '',
                    spec, source.fps, ': live, the newest frame each time' if live else
                    f', {source.frame_count or "?"} frames', detector.threshold_, detector.threshold_source_)
        try:
            with sigterm_as_interrupt():
                if live:  # one frame at a time: a batch would wait for frames that are stale when scored
                    newest = NewestFrames(source)
                    scored = ((frame, next(detector.inspect([frame.image], desc=None))) for frame in newest)
                else:  # inspect gets the bare images; frames and results line up by position
                    frames, shown = read_ahead(source), collections.deque()
                    images = (shown.append(dataclasses.replace(f, image=None)) or f.image for f in frames)
                    results = detector.inspect(images, desc='video')
                    scored = ((shown.popleft(), result) for result in results)
                for frame, result in scored:
                    latency = time.monotonic() - frame.captured if live else None
                    tally.add(result.anomaly, latency)
                    record = {'frame': frame.index, 'time_s': round(frame.time_s, 3), 'score': result.score,
                              'anomaly': result.anomaly, 'conditions': result.conditions.to_json()}
                    records.write(record if latency is None else dict(record, latency_s=round(latency, 4)))
                    _tell_the_line(report, records, result, latency, frame=frame.index, time_s=record['time_s'])
                    if video:
                        video.submit(result.view, result.anomaly_map, result.score, detector.threshold_,
                                     detector.pixel_threshold_, f'frame {frame.index}  {frame.time_s:.2f} s')
                    logger.debug('frame %d: score %.3f -> %s', frame.index, result.score,
                                 'ANOMALY' if result.anomaly else 'normal')
                    if live and tally.due():
                        logger.info('%d frames scored (%d anomalous), %d skipped, %.1f frames/s, latency %s',
                                    tally.scored, tally.anomalous, newest.skipped, tally.rate(), tally.latency())
        except KeyboardInterrupt:
            interrupted = True
        finally:
            for closable in (results, frames, newest):  # the pipeline's threads end here, not at garbage collection
                if closable is not None:
                    closable.close()
        if video:
            video.close()
            video = None
    finally:
        if video:  # an error: no half-written video
            video.close(keep=False)
        source.release()
        summary = dict(source=spec, frames_scored=tally.scored, frames_skipped=newest.skipped if newest else 0,
                       fps=round(tally.rate(), 3), source_fps=source.fps, latency_s=tally.latency(),
                       **_base_summary(detector, tally, interrupted, report))
        report.finished(summary)
        records.write({'summary': summary})
        records.close()
    logger.info('%s: %d frames scored, %d anomalous, %d skipped, %.1f frames/s%s%s', spec, tally.scored,
                tally.anomalous, summary['frames_skipped'], summary['fps'],
                f', latency median {summary["latency_s"]["median"] * 1000:.0f} ms' if summary['latency_s'] else '',
                f'; annotated video {savepath}' if savepath else '')
    return summary


# ----------------------------------------------------------------------------------------------
# watched folders
# ----------------------------------------------------------------------------------------------

def _open_for_writing(path):
    """Whether a process holds `path` open for writing, where Linux can tell: a read lease is refused
    (EAGAIN) exactly then. False where it cannot tell (not Linux, not our file, a network file system)."""
    if fcntl is None or not hasattr(fcntl, 'F_SETLEASE'):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as e:
        return e.errno == errno.EAGAIN
    finally:
        os.close(fd)


class CompletedFiles:
    """Image files under `folder` (recursively) once completely written, each version reported once.

    A file is complete when its size and modification time have stayed the same for settle_s (its
    modification time is that old, or two scans settle_s apart saw it unchanged) and no process holds
    it open for writing (where the system can tell, see _open_for_writing). A file that changes again
    is reported again. `exclude`: directories not to look into (the figures written meanwhile).
    """

    def __init__(self, folder, settle_s=WATCH_SETTLE_S, exclude=()):
        self.folder, self.settle_s = folder, settle_s
        self.exclude = {os.path.realpath(d) for d in exclude}
        self.pending = {}   # path -> (size, mtime_ns), monotonic time first seen so
        self.reported = {}  # path -> (size, mtime_ns) reported

    def poll(self):
        """The files complete since the last poll, in path order."""
        now, wall, ready, present = time.monotonic(), time.time_ns(), [], set()
        for path in image_utils.walk_images(self.folder, self.exclude):
            try:
                stat = os.stat(path)
            except OSError:  # vanished since the listing
                continue
            present.add(path)
            signature = (stat.st_size, stat.st_mtime_ns)
            if self.reported.get(path) == signature:
                continue
            if path not in self.pending or self.pending[path][0] != signature:
                self.pending[path] = signature, now
            settled = (wall - stat.st_mtime_ns >= self.settle_s * 1e9 or now - self.pending[path][1] >= self.settle_s)
            if stat.st_size and settled and not _open_for_writing(path):
                ready.append(path)
                self.reported[path] = signature
                del self.pending[path]
        for table in (self.pending, self.reported):  # a removed file is forgotten: if it comes back, it is new
            for path in [p for p in table if p not in present]:
                del table[path]
        return ready


def report_image(detector, path, inspected, anomalous, figure=None, figures=None):
    """One scored image file, as image mode and --watch report it: its figure queued on the
    plot_utils.FigureWriter `figures` (where `figure` names one), its log line, and its JSON record
    {path, score, anomaly, conditions} -> the record. Paths are shown as valid UTF-8 whatever bytes
    they hold."""
    shown = image_utils.display_path(path)
    if figure:
        figures.submit(figure, inspected.view, inspected.gt_mask, inspected.anomaly_map, inspected.score,
                       detector.threshold_, detector.pixel_threshold_, title=shown)
    logger.info('%s : score %.3f threshold %.3f -> %s%s', shown, inspected.score, detector.threshold_,
                'ANOMALY' if anomalous else 'normal', f'  [{image_utils.display_path(figure)}]' if figure else '')
    return {'path': shown, 'score': inspected.score, 'anomaly': bool(anomalous),
            'conditions': inspected.conditions.to_json() if inspected.conditions else None}


def watch_folder(detector, folder, figures_dir=None, json_path=None, poll_s=WATCH_POLL_S, settle_s=WATCH_SETTLE_S,
                 report=None):
    """--watch: score every image under `folder`, then every new (or rewritten) one once completely
    written, until Ctrl-C or SIGTERM -> the summary dict.

    Per file: a log line, a JSON line {path, score, anomaly, conditions} to json_path (and the drift
    and score-shift warnings, {"drift": {...}}, {"score_shift": {...}}), the four-panel figure to figures_dir (None: no figures), and `report`
    (a publish.LineReport: messages, metrics; default one that only watches the conditions) is told,
    with the latency from the file found complete to its verdict; a file that vanishes or cannot be
    decoded is a warning (and a message with verdict "error").
    """
    if not os.path.isdir(folder):
        raise UsageError(f'--watch: no such directory: {folder}')
    report = report or publish.LineReport(detector, f'watch:{folder}')
    files = CompletedFiles(folder, settle_s, exclude=[figures_dir] if figures_dir else [])
    tally, interrupted = _Tally(), False
    records = JsonLines(json_path)
    logger.info('watching %s (threshold %.3f from %s); Ctrl-C ends', folder, detector.threshold_,
                detector.threshold_source_)
    try:
        with plot_utils.FigureWriter() as figures, sigterm_as_interrupt():
            try:
                while True:
                    ready, found = files.poll(), time.monotonic()
                    if not ready:
                        time.sleep(poll_s)
                        continue
                    with contextlib.closing(detector.inspect(ready, desc=None)) as results:
                        for result in results:
                            if result.error:  # inspect has logged it as a warning
                                tally.unreadable += 1
                                report.failed(result.error, path=image_utils.display_path(result.path))
                                continue
                            tally.add(result.anomaly)
                            figure = figures_dir and fit_path(os.path.join(
                                figures_dir, image_utils.flat_name(result.path, folder) + '.png'))
                            record = report_image(detector, result.path, result, result.anomaly, figure, figures)
                            records.write(record)
                            _tell_the_line(report, records, result, time.monotonic() - found, path=record['path'])
            except KeyboardInterrupt:
                interrupted = True
    finally:
        summary = dict(folder=folder, files_scored=tally.scored, unreadable=tally.unreadable,
                       files_per_s=round(tally.rate(), 3), **_base_summary(detector, tally, interrupted, report))
        report.finished(summary)
        records.write({'summary': summary})
        records.close()
    logger.info('watch %s ended: %d files scored, %d anomalous, %d unreadable', folder, tally.scored,
                tally.anomalous, tally.unreadable)
    return summary
