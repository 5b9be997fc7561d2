"""Seeded fuzz test: a few hundred mutated PNG/JPEG/TIFF/BMP files and tampered feature files, read
in a child process under an address-space limit. Asserts no exception but the tool's own, no crash
signal, and a bounded peak memory."""
import json
import os
import resource
import subprocess
import sys

import numpy as np

from tests import hostile
from tests.conftest import REPO

SEED = 15
MUTATIONS_PER_IMAGE = 18
MUTATIONS_PER_FEATURE_FILE = 30
MAX_PIXELS = 4 << 20              # the child's --max_pixels
ADDRESS_SPACE_LIMIT = 3 << 30     # the child dies of MemoryError, not the machine, if decoding ran away
# Peak RSS bound: the interpreter with numpy, OpenCV and scikit-learn (~180 MB), one image at the
# pixel limit decoded (6 bytes a pixel) and a margin for the decoders' own buffers.
PEAK_RSS_LIMIT_MB = 180 + 6 * MAX_PIXELS / 2**20 + 150


def write_cases(folder):
    rng = np.random.default_rng(SEED)
    images, features = folder / 'images', folder / 'features'
    images.mkdir()
    features.mkdir()
    for name, data in hostile.base_images(rng).items():
        (images / name).write_bytes(data)
        stem, extension = os.path.splitext(name)
        for i in range(MUTATIONS_PER_IMAGE):
            (images / f'{stem}_{i:02d}{extension}').write_bytes(hostile.mutate(data, rng))
    for name, data in hostile.oversized_headers(30000, 20000).items():
        (images / name).write_bytes(data)
    (images / 'bomb.png').write_bytes(hostile.png_bomb(3000, 3000))  # 9 MP: above the child's limit
    for method in ('mahalanobis', 'padim', 'spade', 'patchcore'):
        data = hostile.feature_file_bytes(*hostile.fitted(method))
        (features / f'{method}.pkl').write_bytes(data)
        for i in range(MUTATIONS_PER_FEATURE_FILE):
            (features / f'{method}_{i:02d}.pkl').write_bytes(hostile.mutate_feature_file(data, rng))


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def test_fuzzed_files_never_crash_and_stay_within_memory(tmp_path):
    write_cases(tmp_path)
    result = subprocess.run([sys.executable, '-m', 'tests.fuzz_child', str(tmp_path), str(MAX_PIXELS)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, preexec_fn=limit_address_space)
    assert result.returncode >= 0, f'crashed with signal {-result.returncode}: {result.stderr[-3000:]}'
    assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print('fuzz summary:', summary)
    assert summary['images'] + summary['feature_files'] >= 300
    assert summary['refused'] > 100 and summary['accepted'] > 50  # both outcomes exercised
    assert summary['peak_rss_mb'] < PEAK_RSS_LIMIT_MB, summary
