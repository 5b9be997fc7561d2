"""The four-panel figure: input, ground truth, predicted heat map, segmentation result."""
import io

import matplotlib

matplotlib.use('Agg')  # no display on production-line PCs and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import mark_boundaries  # noqa: E402

from model_utils import atomic_write_bytes  # noqa: E402


def save_figure(path, image, gt_mask, anomaly_map, score, threshold, pixel_threshold, title=''):
    """Write the figure for one image to `path` (PNG, atomically).

    image: RGB uint8 (S, S, 3), the network's view; gt_mask: bool (S, S) or None;
    anomaly_map: float (S, S) pixel distances or None when the model cannot localise;
    score, threshold: image score and threshold; pixel_threshold: map value above which a pixel is
    predicted defective. The heat map's colour scale is [0, 2 * pixel_threshold] for every image,
    so colours compare across figures and the threshold sits mid-scale.
    """
    verdict = 'ANOMALY' if score >= threshold else 'normal'
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title('Input')
    if gt_mask is not None:
        axes[1].imshow(gt_mask, cmap='gray', vmin=0, vmax=1)
    else:
        axes[1].imshow(np.full(image.shape[:2], 0.5), cmap='gray', vmin=0, vmax=1)
        axes[1].text(0.5, 0.5, 'no mask', ha='center', va='center', transform=axes[1].transAxes)
    axes[1].set_title('Ground truth')
    if anomaly_map is not None:
        axes[2].imshow(image)
        heat = axes[2].imshow(anomaly_map, cmap='jet', alpha=0.5, vmin=0, vmax=2 * pixel_threshold)
        fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.04)
        axes[2].set_title('Predicted heat map')
        predicted_mask = anomaly_map >= pixel_threshold
        axes[3].imshow(mark_boundaries(image, predicted_mask, color=(1, 0, 0), mode='thick'))
        axes[3].set_title('Segmentation result')
    else:
        for ax, name in ((axes[2], 'Predicted heat map'), (axes[3], 'Segmentation result')):
            ax.imshow(image)
            ax.text(0.5, 0.5, 'no map: this model\nscores whole images only', ha='center', va='center',
                    transform=ax.transAxes, color='white', backgroundcolor='black')
            ax.set_title(name)
    fig.suptitle(f'{title}\nscore {score:.2f}  threshold {threshold:.2f}  ->  {verdict}',
                 color='red' if verdict == 'ANOMALY' else 'black')
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
