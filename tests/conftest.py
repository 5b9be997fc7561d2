import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MVTEC = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'mvtec')

import model_utils  # noqa: E402


@pytest.fixture(scope='session')
def model_dir(tmp_path_factory):
    """A model cache with lite0 converted once for the whole session."""
    folder = str(tmp_path_factory.mktemp('models'))
    model_utils.resolve_model('lite0', folder)
    return folder


@pytest.fixture(scope='session')
def small_train(tmp_path_factory):
    """12 good bottle images from the sample data: enough for a quick fit."""
    folder = tmp_path_factory.mktemp('train')
    for name in sorted(os.listdir(os.path.join(REPO, 'train')))[:12]:
        if name.endswith('.png'):
            shutil.copy(os.path.join(REPO, 'train', name), folder / name)
    return str(folder)


class Payload:
    """Pickling this plants a `__reduce__` call that would create `marker` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1')


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Hermetic tests: resolving or connecting to anything but loopback fails loudly (before any
    packet leaves: name resolution is refused too)."""
    import ipaddress
    import socket
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def is_loopback(host):
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host in LOOPBACK_NAMES

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not is_loopback(host if isinstance(host, str) else host.decode()):
            raise AssertionError(f'test tried to resolve {host}: only loopback is allowed')
        return getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and not is_loopback(address[0]):
            raise AssertionError(f'test tried to reach {address}: only loopback is allowed')
        return connect(sock, address)
    monkeypatch.setattr(socket, 'getaddrinfo', guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, 'connect', guarded_connect)
