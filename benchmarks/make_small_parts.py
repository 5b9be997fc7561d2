"""A small-part development set from the MVTec copies: every part a third of its size in its frame.

    python3 benchmarks/make_small_parts.py --data_path ../shared/data/mvtec --out /tmp/small_parts
    python3 evaluate.py --data_path /tmp/small_parts --method patchcore --input_size 224 384

For each category (metal_nut and bottle by default), every image of train/ and test/ and every mask
of ground_truth/ is scaled to FRAME / 3 pixels square (INTER_AREA for images, INTER_NEAREST for masks)
and pasted in the centre of a FRAME x FRAME image (320, metal_nut's size) filled with the image's
background colour (the median of its outermost pixels; masks: 0). A defect then covers a ninth of the
pixels of the frame that it covers of the original image's, and the parts keep their orientation
(metal_nut's turn at random). The output is <out>/<category>_small/ in the MVTec layout with an
ATTRIBUTION.md and DATA_LICENSE.txt: MVTec AD is CC BY-NC-SA 4.0, so the set must not be committed
or shipped without them.
"""
import argparse
import os
import shutil
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
from file_io import atomic_write_bytes  # noqa: E402

FRAME = 320
SCALE = 3  # the part's side is FRAME / SCALE
ATTRIBUTION = """# {name}: derived from MVTec AD "{category}" (CC BY-NC-SA 4.0)

Made by `benchmarks/make_small_parts.py` from `{source}`: every image scaled to {part} x {part} px
(cv2.INTER_AREA; masks cv2.INTER_NEAREST) and pasted in the centre of a {frame} x {frame} frame of its
background colour (masks: 0). For development only: do not commit or ship it.

The images are from the MVTec Anomaly Detection dataset, (c) 2019 MVTec Software GmbH, licensed under
Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International (full text: `DATA_LICENSE.txt`
beside this file; https://creativecommons.org/licenses/by-nc-sa/4.0/). Non-commercial use only;
derivatives must be shared under the same licence.

Please cite: Paul Bergmann, Michael Fauser, David Sattlegger, Carsten Steger, "A Comprehensive
Real-World Dataset for Unsupervised Anomaly Detection", CVPR 2019.
"""


def background(image):
    """The median colour of an image's outermost pixels (its frame)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0).astype(image.dtype)


def small_part(image, is_mask):
    """`image` (H, W[, 3]) scaled to FRAME / SCALE square, in the centre of a FRAME square of its background."""
    part = FRAME // SCALE
    small = cv2.resize(image, (part, part), interpolation=cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA)
    frame = np.zeros((FRAME, FRAME) + image.shape[2:], image.dtype)
    frame[...] = 0 if is_mask else background(image)
    top = (FRAME - part) // 2
    frame[top:top + part, top:top + part] = small
    return frame


def convert(source, target):
    """Every image under source/{train,test,ground_truth} -> the same path under target."""
    count = 0
    for sub in ('train', 'test', 'ground_truth'):
        folder = os.path.join(source, sub)
        if not os.path.isdir(folder):
            continue
        for path in image_utils.walk_images(folder):
            is_mask = sub == 'ground_truth'
            image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if is_mask else cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f'cannot read {path}')
            out = os.path.join(target, os.path.relpath(path, source))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            encoded = cv2.imencode('.png', small_part(image, is_mask))[1]
            atomic_write_bytes(os.path.splitext(out)[0] + '.png', encoded.tobytes())
            count += 1
    return count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', default=os.path.join(ROOT, '..', 'shared', 'data', 'mvtec'),
                   help='MVTec-layout root holding the categories')
    p.add_argument('--out', required=True, help='folder to write <category>_small/ into (not in the repository)')
    p.add_argument('--category', nargs='+', default=['metal_nut', 'bottle'])
    args = p.parse_args(argv)
    for category in args.category:
        source, name = os.path.join(args.data_path, category), f'{category}_small'
        if not os.path.isdir(os.path.join(source, 'train')):
            raise SystemExit(f'no {category}/train in {args.data_path}')
        target = os.path.join(args.out, name)
        count = convert(source, target)
        atomic_write_bytes(os.path.join(target, 'ATTRIBUTION.md'), ATTRIBUTION.format(
            name=name, category=category, source=os.path.abspath(source), part=FRAME // SCALE,
            frame=FRAME).encode())
        shutil.copyfile(os.path.join(ROOT, 'DATA_LICENSE.txt'), os.path.join(target, 'DATA_LICENSE.txt'))
        print(f'{target}: {count} images and masks')


if __name__ == '__main__':
    main()
