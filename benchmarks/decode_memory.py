"""Peak memory of decoding the largest accepted images (issue 15's measured acceptance).

    python3 benchmarks/decode_memory.py                      # images at the default --max_pixels
    python3 benchmarks/decode_memory.py --pixels 16000000 --baseline OLD_IMAGE_UTILS.py

The sample image good_000.png is enlarged to a square of --pixels pixels and written as 8-bit RGB
PNG, 8-bit JPEG, 16-bit RGBA PNG and 16-bit RGB TIFF. Each is turned into the network's view by
`image_utils.load_view` in a fresh child process, which reports its peak resident memory (VmHWM)
above what it had after importing. --baseline repeats that with another copy of image_utils.py (for
example the one before issue 15) for comparison in the same run. Prints one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402

CHILD = '''
import importlib.util, json, sys
def peak_kb():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, from before exec)
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
spec = importlib.util.spec_from_file_location('image_utils', sys.argv[1])
image_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_utils)
kwargs = {'max_pixels': int(sys.argv[3])} if 'max_pixels' in image_utils.load_view.__code__.co_varnames else {}
before = peak_kb()
try:
    view, shape = image_utils.load_view(sys.argv[2], 256, 224, **kwargs)
    outcome = f'{shape[1]}x{shape[0]} -> {view.shape}'
except Exception as e:
    outcome = f'{type(e).__name__}: {e}'
print(json.dumps({'outcome': outcome[:160],
                  'peak_mb': (peak_kb() - before) / 1024}))
'''


def make_images(folder, pixels):
    side = int(pixels ** 0.5)
    picture = cv2.resize(cv2.imread(os.path.join(ROOT, 'images', 'good_000.png')), (side, side),
                         interpolation=cv2.INTER_LINEAR)
    deep = picture.astype(np.uint16) * 257
    files = {'rgb8.png': (picture, [cv2.IMWRITE_PNG_COMPRESSION, 1]),
             'rgb8.jpg': (picture, [cv2.IMWRITE_JPEG_QUALITY, 95]),
             'rgba16.png': (np.dstack([deep, np.full((side, side), 65535, np.uint16)]),
                            [cv2.IMWRITE_PNG_COMPRESSION, 1]),
             'rgb16.tif': (deep, [])}
    paths = {}
    for name, (array, params) in files.items():
        paths[name] = os.path.join(folder, name)
        assert cv2.imwrite(paths[name], array, params), name
    return side, paths


def peak(module_path, image_path, pixels):
    result = subprocess.run([sys.executable, '-c', CHILD, module_path, image_path, str(pixels)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode:
        return {'outcome': f'exit {result.returncode}: {result.stderr.strip()[-200:]}', 'peak_mb': None}
    return json.loads(result.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--pixels', type=int, default=image_utils.DEFAULT_MAX_PIXELS)
    p.add_argument('--baseline', default=None, help='another image_utils.py to measure alongside')
    args = p.parse_args()
    modules = {'current': os.path.join(ROOT, 'image_utils.py')}
    if args.baseline:
        modules['baseline'] = os.path.abspath(args.baseline)
    with tempfile.TemporaryDirectory() as folder:
        side, paths = make_images(folder, args.pixels)
        rows = []
        for name, path in paths.items():
            row = {'image': f'{name} {side}x{side}', 'file_mb': round(os.path.getsize(path) / 2**20, 1)}
            for label, module in modules.items():
                measured = peak(module, path, args.pixels)
                row[f'{label}_peak_mb'] = measured['peak_mb'] and round(measured['peak_mb'])
                row[f'{label}_outcome'] = measured['outcome']
            rows.append(row)
            print(row, file=sys.stderr)
    print(json.dumps({'pixels': side * side, 'rows': rows}))


if __name__ == '__main__':
    main()
