"""b0..b7 downloads against a server on 127.0.0.1 started here (no other address is contacted)."""
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import backbone_graph
import mahalanobisad
import model_utils
from model_utils import ModelError
from tests.conftest import REPO


def ailia_shaped_model(pool='GlobalAveragePool'):
    """Bytes of a small ONNX model shaped like the ailia EfficientNet ones: a fixed-batch input
    (1, 3, 224, 224) and several globally pooled outputs (1, C, 1, 1), from stride 4 to 32."""
    rng = np.random.default_rng(0)
    nodes, initializers, outputs = [], [], []
    x, channels = 'input', 3
    for level, (stride, width) in enumerate([(4, 32), (2, 64), (2, 128), (2, 256)]):
        scale = 1 / np.sqrt(channels * stride * stride)
        w = numpy_helper.from_array((rng.standard_normal((width, channels, stride, stride)) * scale).astype(np.float32),
                                    f'w{level}')
        initializers.append(w)
        nodes.append(helper.make_node('Conv', [x, w.name], [f'c{level}'], strides=[stride, stride],
                                      kernel_shape=[stride, stride]))
        nodes.append(helper.make_node('Relu', [f'c{level}'], [f'r{level}']))
        if pool == 'GlobalAveragePool':
            nodes.append(helper.make_node('GlobalAveragePool', [f'r{level}'], [f'feature{level}']))
        else:  # max pooling has no spatial map to expose
            nodes.append(helper.make_node('GlobalMaxPool', [f'r{level}'], [f'feature{level}']))
        outputs.append(helper.make_tensor_value_info(f'feature{level}', TensorProto.FLOAT, [1, width, 1, 1]))
        x, channels = f'r{level}', width
    graph = helper.make_graph(nodes, 'ailia_like', [helper.make_tensor_value_info('input', TensorProto.FLOAT,
                                                                                   [1, 3, 224, 224])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    model.ir_version = 8
    return model.SerializeToString()


class ModelServer:
    """Serves one file under any path, misbehaving as told: `plan` is a list of behaviours for the
    successive requests ('ok', '404', '500', 'cut', 'stall', 'slow'); the last one repeats."""

    def __init__(self, body):
        self.body, self.plan, self.requests = body, ['ok'], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_GET(self):
                behaviour = server.plan[min(len(server.requests), len(server.plan) - 1)]
                server.requests.append((self.path, self.headers.get('Range'), behaviour))
                if behaviour in ('404', '500'):
                    self.send_response(int(behaviour))
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                start = 0
                if self.headers.get('Range'):
                    start = int(self.headers['Range'].split('=')[1].split('-')[0])
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(server.body) - 1}/{len(server.body)}')
                else:
                    self.send_response(200)
                rest = server.body[start:]
                self.send_header('Content-Length', str(len(rest)))
                self.end_headers()
                if behaviour == 'cut':  # half the body, then the connection drops
                    self.wfile.write(rest[:len(rest) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if behaviour == 'stall':
                    self.wfile.write(rest[:100])
                    self.wfile.flush()
                    time.sleep(3)
                    return
                if behaviour == 'slow':
                    for i in range(0, len(rest), len(rest) // 10 + 1):
                        self.wfile.write(rest[i:i + len(rest) // 10 + 1])
                        self.wfile.flush()
                        time.sleep(0.1)
                    return
                self.wfile.write(rest)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/models/'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ModelServer(ailia_shaped_model())
    yield s
    s.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(model_utils, 'BACKOFF_S', 0.01)
    monkeypatch.setattr(model_utils, 'READ_TIMEOUT_S', 0.5)
    monkeypatch.delenv(model_utils.MODEL_URL_ENV, raising=False)


def test_download_validate_and_reuse_without_request(server, tmp_path):
    spec, path = model_utils.resolve_model('b0', str(tmp_path), server.url)
    assert path == str(tmp_path / 'efficientnet-b0.onnx') and spec.input_size == 224
    assert os.listdir(tmp_path) == ['efficientnet-b0.onnx']
    assert open(path, 'rb').read() == server.body
    assert server.requests == [('/models/efficientnet-b0.onnx', None, 'ok')]
    model_utils.resolve_model('b0', str(tmp_path), server.url)
    assert len(server.requests) == 1  # the cache is used: no request


def test_url_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv(model_utils.MODEL_URL_ENV, server.url)
    model_utils.resolve_model('b3', str(tmp_path))
    assert server.requests[0][0] == '/models/efficientnet-b3.onnx'


def test_server_error_then_success_is_retried(server, tmp_path):
    server.plan = ['500', '500', 'ok']
    model_utils.resolve_model('b0', str(tmp_path), server.url)
    assert [r[2] for r in server.requests] == ['500', '500', 'ok']
    assert os.listdir(tmp_path) == ['efficientnet-b0.onnx']


def test_cut_off_body_is_resumed_with_a_range_request(server, tmp_path):
    server.plan = ['cut', 'ok']
    _, path = model_utils.resolve_model('b0', str(tmp_path), server.url)
    resumed_at = int(server.requests[1][1].split('=')[1].rstrip('-'))
    assert 0 < resumed_at <= len(server.body) // 2
    assert open(path, 'rb').read() == server.body


def test_corrupt_cache_is_replaced(server, tmp_path):
    (tmp_path / 'efficientnet-b0.onnx').write_bytes(server.body[:1000])
    _, path = model_utils.resolve_model('b0', str(tmp_path), server.url)
    assert open(path, 'rb').read() == server.body and len(server.requests) == 1


@pytest.mark.parametrize('plan, message', [
    (['404'], 'HTTP 404'),
    (['cut'], 'after 4 attempts'),
    (['stall'], 'after 4 attempts'),
    (['500'], 'HTTP 500 (after 4 attempts)'),
])
def test_failures_leave_nothing_and_say_what_to_do(server, tmp_path, plan, message):
    server.plan = plan
    with pytest.raises(ModelError) as error:
        model_utils.resolve_model('b0', str(tmp_path), server.url)
    text = str(error.value)
    assert message in text and '\n' not in text
    assert f'cannot download {server.url}efficientnet-b0.onnx' in text
    assert f'Copy the file by hand to {tmp_path / "efficientnet-b0.onnx"}' in text and '-m lite0' in text
    assert os.listdir(tmp_path) == []


def test_bytes_that_are_not_onnx_are_refused(tmp_path):
    server = ModelServer(b'<html>not a model</html>' * 100)
    try:
        with pytest.raises(ModelError, match='the downloaded file is not a usable ONNX model'):
            model_utils.resolve_model('b0', str(tmp_path), server.url)
    finally:
        server.close()
    assert os.listdir(tmp_path) == []


def test_unreachable_server_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nobody listening
        s.bind(('127.0.0.1', 0))
        url = f'http://127.0.0.1:{s.getsockname()[1]}/'
    with pytest.raises(ModelError, match='cannot download .* Copy the file by hand'):
        model_utils.resolve_model('b0', str(tmp_path), url)
    assert os.listdir(tmp_path) == []


def test_two_processes_downloading_at_once(server, tmp_path):
    server.plan = ['slow']
    code = ('import sys; sys.path.insert(0, sys.argv[1]); import model_utils; '
            'model_utils.resolve_model("b0", sys.argv[2], sys.argv[3])')
    processes = [subprocess.Popen([sys.executable, '-c', code, REPO, str(tmp_path), server.url]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    assert os.listdir(tmp_path) == ['efficientnet-b0.onnx']
    assert open(tmp_path / 'efficientnet-b0.onnx', 'rb').read() == server.body
    assert len(server.requests) == 1  # the second waited for the first and reused its file


def test_pooled_outputs_are_turned_back_into_maps(tmp_path):
    path = tmp_path / 'm.onnx'
    path.write_bytes(ailia_shaped_model())
    extractor = model_utils.FeatureExtractor(str(path))
    assert extractor.spatial_rewrites == 4 and extractor.fixed_batch == 1
    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    maps = extractor(batch)
    assert [m.shape for m in maps] == [(3, 32, 56, 56), (3, 64, 28, 28), (3, 128, 14, 14), (3, 256, 7, 7)]
    import onnxruntime as ort
    pooled = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'input': batch[:1]})
    for m, p in zip(maps, pooled):  # the original outputs are the maps' averages
        np.testing.assert_allclose(m[:1].mean(axis=(2, 3), keepdims=True), p, rtol=1e-4, atol=1e-6)


def test_reduce_mean_outputs_are_rewritten_too():
    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 8, 8])
    nodes = [helper.make_node('Relu', ['x'], ['r']),
             helper.make_node('ReduceMean', ['r'], ['m'], axes=[2, 3], keepdims=0),
             helper.make_node('ReduceMean', ['r'], ['c'], axes=[1], keepdims=1)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ('m', 'c')]
    model = helper.make_model(helper.make_graph(nodes, 'g', [x], outputs), opset_imports=[helper.make_opsetid('', 13)])
    assert backbone_graph.expose_spatial_outputs(model) == 1
    assert [o.name for o in model.graph.output] == ['r', 'c']  # the channel mean is not spatial


def cli_env(url):
    return dict(os.environ, **{model_utils.MODEL_URL_ENV: url})


def test_cli_end_to_end_with_a_downloaded_model(server, tmp_path):
    """The issue's acceptance command, as a subprocess against the loopback server."""
    report, model_dir = tmp_path / 'out.json', tmp_path / 'models'
    command = [sys.executable, 'mahalanobisad.py', '-m', 'b0', '--model_dir', str(model_dir), '--json', str(report),
               '-f', str(tmp_path / 'b0.pkl'), '-s', str(tmp_path / 'figures')]
    result = subprocess.run(command, cwd=REPO, env=cli_env(server.url), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert os.listdir(model_dir) == ['efficientnet-b0.onnx']
    out = json.loads(report.read_text())
    assert out['model'] == 'efficientnet-b0' and len(out['images']) == 16
    assert all(np.isfinite(i['score']) for i in out['images'])
    assert out['pixel_threshold'] is not None  # maps recovered from the pooled outputs: real heat maps
    assert len(os.listdir(tmp_path / 'figures')) == 16


def test_cli_download_cut_short_exits_nonzero_and_leaves_nothing(tmp_path):
    server = ModelServer(ailia_shaped_model())
    server.plan = ['cut']
    try:
        model_dir = tmp_path / 'models'
        result = subprocess.run([sys.executable, 'mahalanobisad.py', '-m', 'b0', '--model_dir', str(model_dir),
                                 '-i', 'images/good_000.png', '-f', str(tmp_path / 'b0.pkl')],
                                cwd=REPO, env=cli_env(server.url), capture_output=True, text=True, timeout=300)
    finally:
        server.close()
    assert result.returncode == 1
    assert 'mahalanobisad.py: error: cannot download' in result.stderr and 'Traceback' not in result.stderr
    assert os.listdir(model_dir) == [] and not os.path.exists(tmp_path / 'b0.pkl')


def test_model_without_maps_scores_images_only(tmp_path, small_train, caplog):
    path = tmp_path / 'maxpool.onnx'
    path.write_bytes(ailia_shaped_model(pool='GlobalMaxPool'))
    report = tmp_path / 'r.json'
    caplog.set_level('WARNING')
    assert mahalanobisad.run(['-m', str(path), '-tr', small_train, '-f', str(tmp_path / 'f.pkl'),
                              '-i', 'images/broken_large_000.png', '-s', str(tmp_path / 'fig.png'),
                              '--json', str(report)]) == 0
    out = json.loads(report.read_text())
    assert out['pixel_threshold'] is None and len(out['images']) == 1
    assert 'image-level scores only, no heat maps' in caplog.text
    assert os.path.getsize(tmp_path / 'fig.png') > 0


def test_patch_method_on_a_model_without_maps_is_a_clear_error(tmp_path, small_train, capsys):
    path = tmp_path / 'maxpool.onnx'
    path.write_bytes(ailia_shaped_model(pool='GlobalMaxPool'))
    code = mahalanobisad.run(['-m', str(path), '--method', 'padim', '-tr', small_train, '-f', str(tmp_path / 'f.pkl'),
                              '-i', 'images/good_000.png', '--no_figures'])
    err = capsys.readouterr().err
    assert code == 1 and 'mahalanobisad.py: error: padim needs feature maps of stride 4..16' in err
    assert not os.path.exists(tmp_path / 'f.pkl')
