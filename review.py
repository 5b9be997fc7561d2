"""Review and relearn on a feature file: teach it images, undo a change, all under a lock.

A change (Detector.partial_fit, Detector.add_defects) is made on the file as it is on disk when the
lock is taken, and written atomically: a command line and a console updating one feature file at once
never lose an update. The lock is an fcntl advisory lock on `<file>.lock` beside it; a second writer
waits up to `timeout` seconds, then fails with one line. Before a change is written, the file as it
was is kept as its undo point, `<file>.undo/<entry id>.npz` (one feature file's size per change: the
Gaussians could be estimated again without the rows a change added instead, but a copy undoes every
method, its thresholds and held-out scores alike); `undo` restores the latest change's undo point and records the undo in the
(kept, complete) history.
"""
import contextlib
import fcntl
import hashlib
import logging
import os
import time

import history
from detector import Detector
from errors import FeatureFileError, UsageError
from file_io import atomic_write_bytes, file_sha256

logger = logging.getLogger('mahalanobisad')
LOCK_TIMEOUT_S = 120.0


@contextlib.contextmanager
def locked(path, timeout=LOCK_TIMEOUT_S):
    """Hold the update lock of the feature file `path`; FeatureFileError after `timeout` seconds."""
    lock_path = os.fspath(path) + '.lock'
    with open(lock_path, 'a+b') as handle:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FeatureFileError(f'{path} is being updated by another process (lock {lock_path} held '
                                           f'for over {timeout:g} s): try again when it is done') from None
                if not told:
                    logger.info('waiting for another update of %s to finish', path)
                    told = True
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def undo_dir(path):
    return os.fspath(path) + '.undo'


def _keep_undo_point(path, entry_id):
    """Copy the feature file (as it is before change `entry_id`) to its undo point, atomically -> (name, sha256)."""
    name = f'{entry_id}.npz'
    with open(path, 'rb') as f:  # whole in memory, as Detector.save builds it
        data = f.read()
    atomic_write_bytes(os.path.join(undo_dir(path), name), data)
    return name, hashlib.sha256(data).hexdigest()


def update(path, change, timeout=LOCK_TIMEOUT_S, write=True, **load_options):
    """Load the feature file `path` under its lock, apply `change(detector)` (which appends a history
    entry per change it makes), and if it made any, keep the undo point and save -> the updated Detector.
    write False: a preview, nothing written. load_options: Detector.load's (model_dir, batch_size, ...)."""
    with locked(path, timeout) if write else contextlib.nullcontext():
        detector = Detector.load(path, **load_options)
        entries = len(detector.meta_.setdefault('history', []))
        change(detector)
        if not write or len(detector.meta_['history']) == entries:
            return detector
        first = detector.meta_['history'][entries]  # the undo point is before the first of them
        first['backup'], first['backup_sha256'] = _keep_undo_point(path, first['id'])
        for entry in detector.meta_['history'][entries + 1:]:
            entry['undone_with'] = first['id']  # one undo reverts them together
        detector.save(path)
        for entry in detector.meta_['history'][entries:]:
            logger.info('%s: %s of %d images recorded as change #%d (undo with --undo)', path, entry['kind'],
                        entry['n_images'], entry['id'])
        return detector


def add_good(path, images, by=None, **options):
    """Teach the feature file `path` these good images (Detector.partial_fit) -> Detector."""
    return update(path, lambda detector: detector.partial_fit(images, by=by), **options)


def add_defects(path, images, by=None, **options):
    """Teach the feature file `path` these labelled defects (Detector.add_defects) -> Detector."""
    return update(path, lambda detector: detector.add_defects(images, by=by), **options)


def undo(path, by=None, timeout=LOCK_TIMEOUT_S, **load_options):
    """Revert the latest change still in effect (with the changes applied together with it, as the
    console's apply makes them): its undo point's model and thresholds, with the whole history kept and
    an undo entry appended per change reverted -> the restored Detector. UsageError when nothing can be undone."""
    with locked(path, timeout):
        current = Detector.load(path, **load_options)
        entries = current.meta_.get('history', [])
        entry = history.last_undoable(entries)
        if entry is None:
            raise UsageError(f'{path}: no change to undo')
        point = os.path.join(undo_dir(path), entry['backup'])
        if not os.path.isfile(point) or file_sha256(point) != entry.get('backup_sha256'):
            raise FeatureFileError(f'{path}: the undo point of change #{entry["id"]} ({point}) is missing or altered')
        restored = Detector.load(point, **load_options)
        reverted = [entry['id']] + [e['id'] for e in entries if e.get('undone_with') == entry['id']]
        kept = list(entries)
        for undone in reverted:
            kept.append(history.new_entry(kept, 'undo', by, [], current.thresholds_.to_meta(),
                                          restored.thresholds_.to_meta(), restored.meta_['n_train_images'],
                                          undoes=undone))
        restored.meta_['history'] = kept
        restored.loaded_from_ = path
        restored.save(path)
        logger.info('%s: undid change #%d (%s of %d images)', path, entry['id'], entry['kind'], entry['n_images'])
        return restored
