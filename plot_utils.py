"""The four-panel figure: input, ground truth, predicted heat map, segmentation result.

Drawn with OpenCV into one image (about 10 ms a figure, against 300 ms with matplotlib), and written
by `FigureWriter` on a background thread so that scoring goes on meanwhile.
"""
import concurrent.futures
import threading

import cv2
import numpy as np
from skimage.segmentation import mark_boundaries

from image_utils import display_path
from model_utils import atomic_write_bytes

PANEL = 256            # side of each panel, pixels
MARGIN = 12
TITLE_H = 56           # two lines: the image, then score / threshold / verdict
LABEL_H = 24           # panel titles
COLORBAR_W = 44        # strip and its labels, right of the heat map
FONT = cv2.FONT_HERSHEY_SIMPLEX
RED, BLACK, WHITE, GRAY = (0, 0, 220), (0, 0, 0), (255, 255, 255), (128, 128, 128)  # BGR


def drawable(text):
    """`text` as OpenCV's Hershey fonts can draw it: ASCII only (bytes that are not UTF-8 as \\xNN,
    other characters as '?'). Anything else must never reach cv2.putText."""
    return display_path(text).encode('ascii', 'replace').decode('ascii')


def _text(canvas, text, x, y, scale=0.5, color=BLACK, center=False):
    text = drawable(text)
    if center:
        x -= cv2.getTextSize(text, FONT, scale, 1)[0][0] // 2
    cv2.putText(canvas, text, (int(x), int(y)), FONT, scale, color, 1, cv2.LINE_AA)


def _fit_text(text, width, scale):
    """`text`, shortened from the left with '...' until it fits `width` pixels."""
    while len(text) > 4 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        text = '...' + text[4:]
    return text


def render_figure(image, gt_mask, anomaly_map, score, threshold, pixel_threshold, title=''):
    """The figure as a BGR uint8 image.

    image: RGB uint8 (S, S, 3), the network's view; gt_mask: bool (S, S) or None; anomaly_map:
    float (S, S) pixel distances, or None when the model cannot localise; score, threshold: image
    score and threshold; pixel_threshold: map value from which a pixel is predicted defective. The
    heat map's colour scale is [0, 2 * pixel_threshold] for every image, so colours compare across
    figures and the threshold sits mid-scale.
    """
    anomalous = score >= threshold
    view = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), (PANEL, PANEL), interpolation=cv2.INTER_LINEAR)
    panels = [view]
    if gt_mask is not None:
        panels.append(cv2.resize(np.where(gt_mask, 255, 0).astype(np.uint8), (PANEL, PANEL),
                                 interpolation=cv2.INTER_NEAREST)[..., None].repeat(3, axis=2))
    else:
        blank = np.full((PANEL, PANEL, 3), 160, np.uint8)
        _text(blank, 'no mask', PANEL // 2, PANEL // 2, 0.6, center=True)
        panels.append(blank)
    if anomaly_map is not None:
        scaled = cv2.resize(anomaly_map.astype(np.float32), (PANEL, PANEL), interpolation=cv2.INTER_LINEAR)
        level = np.clip(scaled / (2 * pixel_threshold) * 255, 0, 255).astype(np.uint8)
        panels.append(cv2.addWeighted(view, 0.5, cv2.applyColorMap(level, cv2.COLORMAP_JET), 0.5, 0))
        boundaries = mark_boundaries(view[..., ::-1], scaled >= pixel_threshold, color=(1, 0, 0), mode='thick')
        panels.append(cv2.cvtColor((boundaries * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    else:
        for _ in range(2):
            panel = view.copy()
            cv2.rectangle(panel, (20, PANEL // 2 - 30), (PANEL - 20, PANEL // 2 + 22), BLACK, -1)
            _text(panel, 'no map: this model', PANEL // 2, PANEL // 2 - 8, 0.5, WHITE, center=True)
            _text(panel, 'scores whole images only', PANEL // 2, PANEL // 2 + 12, 0.5, WHITE, center=True)
            panels.append(panel)

    xs = [MARGIN + i * (PANEL + MARGIN) + (COLORBAR_W if i == 3 else 0) for i in range(4)]
    width = xs[-1] + PANEL + MARGIN
    canvas = np.full((TITLE_H + LABEL_H + PANEL + MARGIN, width, 3), 255, np.uint8)
    verdict_color = RED if anomalous else BLACK
    _text(canvas, _fit_text(drawable(title), width - 2 * MARGIN, 0.5), width // 2, 22, 0.5, verdict_color, center=True)
    _text(canvas, f'score {score:.2f}   threshold {threshold:.2f}   ->   {"ANOMALY" if anomalous else "normal"}',
          width // 2, 46, 0.6, verdict_color, center=True)
    top = TITLE_H + LABEL_H
    names = ('Input', 'Ground truth', 'Predicted heat map', 'Segmentation result')
    for x, panel, name in zip(xs, panels, names):
        canvas[top:top + PANEL, x:x + PANEL] = panel
        _text(canvas, name, x + PANEL // 2, top - 7, 0.55, center=True)
    if anomaly_map is not None:
        _draw_colorbar(canvas, xs[2] + PANEL + 4, top, pixel_threshold)
    return canvas


def _draw_colorbar(canvas, x, top, pixel_threshold):
    ramp = np.linspace(255, 0, PANEL).astype(np.uint8)[:, None].repeat(10, axis=1)
    canvas[top:top + PANEL, x:x + 10] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    for fraction, value in ((0, 2 * pixel_threshold), (0.5, pixel_threshold), (1, 0)):
        y = top + int(fraction * (PANEL - 1))
        cv2.line(canvas, (x + 10, y), (x + 13, y), BLACK, 1)
        _text(canvas, f'{value:.0f}', x + 14, min(max(y + 4, top + 8), top + PANEL), 0.4)


def save_figure(path, *args, **kwargs):
    """Render the figure (see render_figure for the arguments) and write it to `path` as PNG, atomically."""
    ok, png = cv2.imencode('.png', render_figure(*args, **kwargs), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    atomic_write_bytes(path, png.tobytes())


class FigureWriter:
    """Writes figures on one background thread, at most `max_pending` queued (memory stays flat).

    with FigureWriter() as writer: writer.submit(path, <save_figure arguments>)
    Leaving the block waits for every figure; an error in one is raised there.
    """

    def __init__(self, max_pending=32):
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.slots = threading.BoundedSemaphore(max_pending)
        self.futures = []

    def submit(self, path, *args, **kwargs):
        self.slots.acquire()
        future = self.pool.submit(save_figure, path, *args, **kwargs)
        future.add_done_callback(lambda _: self.slots.release())
        self.futures = [f for f in self.futures if not f.done() or f.exception()] + [future]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # On an error (or Ctrl-C) queued figures are dropped; one being written completes.
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        if exc[0] is None:
            for future in self.futures:
                future.result()
