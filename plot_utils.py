"""The four-panel figure: input, ground truth, predicted heat map, segmentation result.

Drawn with OpenCV into one image (about 10 ms a figure, against 300 ms with matplotlib), and written
by `FigureWriter` on a background thread so that scoring goes on meanwhile.
"""
import concurrent.futures
import threading

import cv2
import numpy as np
from skimage.segmentation import mark_boundaries

from file_io import atomic_write_bytes, display_path

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
    """`text` (made drawable), shortened from the left with '...' until it fits `width` pixels."""
    text = drawable(text)
    while len(text) > 4 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        text = '...' + text[4:]
    return text


def _heat_map(view, anomaly_map, pixel_threshold):
    """The map resized to the BGR view's side (float32) and the view blended with it in the JET
    colours, 0 to twice the pixel threshold (the scale of every figure and frame)."""
    side = view.shape[0]
    scaled = cv2.resize(anomaly_map.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    level = np.clip(scaled / (2 * pixel_threshold) * 255, 0, 255).astype(np.uint8)
    return scaled, cv2.addWeighted(view, 0.5, cv2.applyColorMap(level, cv2.COLORMAP_JET), 0.5, 0)


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
        scaled, heat = _heat_map(view, anomaly_map, pixel_threshold)
        panels.append(heat)
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
    _text(canvas, _fit_text(title, width - 2 * MARGIN, 0.5), width // 2, 22, 0.5, verdict_color, center=True)
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


# The operator's frame of live inspection (video and camera output): see render_live_frame.
LIVE_PANEL = 320
LIVE_BANNER_H = 64
LIVE_GAUGE_H = 22
LIVE_SIZE = (2 * LIVE_PANEL + 3 * MARGIN, LIVE_BANNER_H + LIVE_GAUGE_H + LABEL_H + LIVE_PANEL + MARGIN)  # (W, H)
GREEN, DARK_RED = (40, 150, 40), (30, 30, 200)  # BGR


def render_live_frame(image, anomaly_map, score, threshold, pixel_threshold, caption=''):
    """One annotated video frame for a line operator, BGR uint8 (LIVE_SIZE[1], LIVE_SIZE[0], 3).

    Top to bottom: a banner in the verdict's colour (green OK / red ANOMALY, readable from across the
    room) with score and threshold; a gauge of the score against the threshold (its middle mark), so a
    drift towards the threshold shows before the verdict flips; then the inspected view with the
    defect's outline (map >= pixel_threshold) beside the heat map (colour scale 0 to twice the pixel
    threshold, as in the figures). No ground-truth panel: a production line has none.
    image: RGB uint8 (S, S, 3) network view; anomaly_map: (S, S) float or None (a method without maps);
    caption: what the frame is (e.g. 'frame 120  4.80 s').
    """
    anomalous = score >= threshold
    width, height = LIVE_SIZE
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[:LIVE_BANNER_H] = DARK_RED if anomalous else GREEN
    cv2.putText(canvas, 'ANOMALY' if anomalous else 'OK', (MARGIN, LIVE_BANNER_H - 16), FONT, 1.5, WHITE, 3,
                cv2.LINE_AA)
    detail = f'score {score:.2f} / threshold {threshold:.2f}'
    detail_w = cv2.getTextSize(detail, FONT, 0.7, 2)[0][0]
    cv2.putText(canvas, detail, (width - MARGIN - detail_w, LIVE_BANNER_H - 24), FONT, 0.7, WHITE, 2, cv2.LINE_AA)

    gauge_top, gauge_w = LIVE_BANNER_H + 6, width - 2 * MARGIN
    fill = int(np.clip(score / (2 * threshold), 0, 1) * gauge_w) if threshold > 0 else gauge_w * anomalous
    cv2.rectangle(canvas, (MARGIN, gauge_top), (MARGIN + gauge_w, gauge_top + 10), GRAY, 1)
    cv2.rectangle(canvas, (MARGIN, gauge_top), (MARGIN + fill, gauge_top + 10), DARK_RED if anomalous else GREEN, -1)
    cv2.line(canvas, (MARGIN + gauge_w // 2, gauge_top - 3), (MARGIN + gauge_w // 2, gauge_top + 13), BLACK, 2)

    view = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), (LIVE_PANEL, LIVE_PANEL), interpolation=cv2.INTER_LINEAR)
    outlined, heat = view.copy(), view.copy()
    if anomaly_map is not None:
        scaled, heat = _heat_map(view, anomaly_map, pixel_threshold)
        contours, _ = cv2.findContours((scaled >= pixel_threshold).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(outlined, contours, -1, RED, 2, cv2.LINE_AA)
        heat_label = 'heat map (0 .. 2x pixel threshold)'
    else:
        heat_label = 'no map: whole-image score only'
    top = LIVE_BANNER_H + LIVE_GAUGE_H + LABEL_H
    for i, (panel, label) in enumerate(((outlined, _fit_text(caption, LIVE_PANEL, 0.55)), (heat, heat_label))):
        x = MARGIN + i * (LIVE_PANEL + MARGIN)
        canvas[top:top + LIVE_PANEL, x:x + LIVE_PANEL] = panel
        _text(canvas, label, x + LIVE_PANEL // 2, top - 7, 0.55, center=True)
    return canvas
