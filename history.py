"""What a detector was taught: the audit trail kept in its feature file (meta key `history`).

Every change to a fitted detector is one entry, appended, never rewritten:
    {'id': its index, 'kind': 'fit' | 'add_good' | 'add_defects' | 'undo', 'time': ISO 8601 UTC,
     'by': who (--by, the console's token name, or the OS user), 'n_images': images taught,
     'images': [{'name', 'sha256'}] of every image taught, 'n_train_images': after the change,
     'thresholds_before' / 'thresholds_after': Thresholds.to_meta() records (None before the fit),
     'skipped': images left out (already taught, unreadable: {'name', 'why'}),
     'backup': the undo point's file name (review.py), 'undoes': the id an undo entry reverts}
The sha256 of an image is its identity: an image already taught is skipped with a note.
"""
import datetime
import getpass
import hashlib
import os

import numpy as np

from file_io import display_path, file_sha256

KINDS = ('fit', 'add_good', 'add_defects', 'undo')
TEACHES_NORMAL = ('fit', 'add_good')  # kinds whose images are in the model as good images


def image_sha256(image):
    """Hex SHA-256 an image is known by: a file's bytes, or an array's shape, dtype and pixels.
    OSError where a file cannot be read."""
    if isinstance(image, np.ndarray):
        digest = hashlib.sha256(f'{image.shape}{image.dtype}'.encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()
    return file_sha256(image)


def image_name(image, index):
    return f'array #{index}' if isinstance(image, np.ndarray) else display_path(os.fspath(image))


def default_user():
    """Who makes a change when nobody is named: the OS user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return 'unknown'


def new_entry(history, kind, by, images, thresholds_before, thresholds_after, n_train_images, **extra):
    """The entry recording a change (see the module's docstring); images [(name, sha256)]."""
    return dict({'id': len(history), 'kind': kind,
                 'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                 'by': by or default_user(), 'n_images': len(images),
                 'images': [{'name': name, 'sha256': digest} for name, digest in images],
                 'n_train_images': n_train_images, 'thresholds_before': thresholds_before,
                 'thresholds_after': thresholds_after}, **extra)


def undone_ids(history):
    return {entry['undoes'] for entry in history if entry['kind'] == 'undo'}


def in_effect(history, kinds=KINDS):
    """The entries of `kinds` that no later undo reverted."""
    undone = undone_ids(history)
    return [entry for entry in history if entry['kind'] in kinds and entry['id'] not in undone]


def taught_digests(history, kinds=TEACHES_NORMAL):
    """sha256 of every image the model holds from entries of `kinds` -> set."""
    return {image['sha256'] for entry in in_effect(history, kinds) for image in entry['images']}


def last_undoable(history):
    """The latest change still in effect that can be undone (it has a backup), or None."""
    return next((entry for entry in reversed(in_effect(history)) if entry.get('backup')), None)


def check(history):
    """ValueError unless `history` is a list of entries as new_entry writes them (a feature file's)."""
    if not isinstance(history, list):
        raise ValueError('history is not a list')
    for i, entry in enumerate(history):
        if not (isinstance(entry, dict) and entry.get('id') == i and entry.get('kind') in KINDS
                and isinstance(entry.get('images'), list) and isinstance(entry.get('by'), str)
                and all(isinstance(image, dict) and isinstance(image.get('sha256'), str) for image in entry['images'])):
            raise ValueError(f'history entry {i} is not a change record')
        if entry['kind'] == 'undo' and not (isinstance(entry.get('undoes'), int) and 0 <= entry['undoes'] < i):
            raise ValueError(f'history entry {i} undoes no earlier entry')


def _threshold_text(record):
    if not record or record.get('image') is None:
        return '-'
    return f'{record["image"]:.4g} ({record.get("source", "?")})'


def format_history(history):
    """The history as lines of text, oldest first (--history)."""
    undone = undone_ids(history)
    lines = []
    for entry in history:
        what = (f'undo of #{entry["undoes"]}' if entry['kind'] == 'undo'
                else f'{entry["kind"]} {entry["n_images"]} images')
        mark = '  [undone]' if entry['id'] in undone else ''
        lines.append(f'#{entry["id"]} {entry["time"]} by {entry["by"]}: {what}, {entry.get("n_train_images")} '
                     f'training images; threshold {_threshold_text(entry.get("thresholds_before"))} -> '
                     f'{_threshold_text(entry.get("thresholds_after"))}{mark}')
        lines += [f'    {image["sha256"][:16]}  {image.get("name", "")}' for image in entry['images']]
        lines += [f'    skipped {skip["name"]}: {skip["why"]}' for skip in entry.get('skipped', [])]
    return lines
