import os

import cv2
import numpy as np
import pytest

import plot_utils


@pytest.fixture
def inputs():
    image = np.full((224, 224, 3), 100, np.uint8)  # gray: any red is drawn by the figure
    anomaly_map = np.full((224, 224), 10.0, np.float32)
    anomaly_map[50:100, 120:180] = 300.0
    return image, anomaly_map > 100, anomaly_map


def test_figure_panels_and_segmentation(inputs):
    image, gt_mask, anomaly_map = inputs
    figure = plot_utils.render_figure(image, gt_mask, anomaly_map, 50.0, 20.0, 100.0, title='x.png')
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[1] > 4 * plot_utils.PANEL
    top = plot_utils.TITLE_H + plot_utils.LABEL_H
    x3 = plot_utils.MARGIN + 3 * (plot_utils.PANEL + plot_utils.MARGIN) + plot_utils.COLORBAR_W
    segmentation = figure[top:top + plot_utils.PANEL, x3:x3 + plot_utils.PANEL].astype(int)
    red = (segmentation[..., 2] > 200) & (segmentation[..., 1] < 50) & (segmentation[..., 0] < 50)
    rows, columns = np.nonzero(red)
    scale = plot_utils.PANEL / 224
    assert 45 * scale <= rows.min() and rows.max() <= 105 * scale  # the boundary surrounds the defect
    assert 115 * scale <= columns.min() and columns.max() <= 185 * scale
    title = figure[:plot_utils.TITLE_H]
    assert ((title[..., 2] > 150) & (title[..., 0] < 80)).any()  # the verdict line is red: ANOMALY


def test_figure_without_map_or_mask(inputs):
    image, _, _ = inputs
    figure = plot_utils.render_figure(image, None, None, 5.0, 20.0, None, title='y.png')
    title = figure[:plot_utils.TITLE_H]
    assert not ((title[..., 2] > 150) & (title[..., 0] < 80)).any()  # normal: no red


def test_figure_writer_writes_every_figure_and_reports_errors(inputs, tmp_path):
    image, gt_mask, anomaly_map = inputs
    with plot_utils.FigureWriter(max_pending=2) as writer:
        for i in range(5):
            writer.submit(str(tmp_path / f'{i}.png'), image, gt_mask, anomaly_map, 1.0, 2.0, 100.0)
    assert sorted(os.listdir(tmp_path)) == [f'{i}.png' for i in range(5)]
    assert cv2.imread(str(tmp_path / '0.png')) is not None
    (tmp_path / 'file').write_text('not a folder')
    with pytest.raises(OSError):
        with plot_utils.FigureWriter() as writer:
            writer.submit(str(tmp_path / 'file' / 'x.png'), image, gt_mask, anomaly_map, 1.0, 2.0, 100.0)
