"""Real parts for the line tests and benchmarks: Debian's Mosquitto broker on a loopback port, a QoS 1
subscriber, a webhook receiver on loopback."""
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import paho.mqtt.client as mqtt

MOSQUITTO = shutil.which('mosquitto') or '/usr/sbin/mosquitto'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(condition, timeout=30, what='the condition'):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        time.sleep(0.02)


class Broker:
    """Debian's mosquitto on a free loopback port (anonymous). Persistence on, so that a subscriber's
    session and the messages queued for it survive the broker being stopped and started again.
    tls_listener: a second listener's lines (its port is tls_port): see tls_listener()."""

    def __init__(self, folder, port=None, tls_listener=None):
        assert os.path.exists(MOSQUITTO), 'Debian mosquitto is needed: apt-get install mosquitto (see .ci/run)'
        self.port, self.tls_port, self.process = port or free_port(), free_port(), None
        self.config = os.path.join(folder, 'mosquitto.conf')
        with open(self.config, 'w') as f:
            # user: run as whoever runs the tests (as root, mosquitto would become the user mosquitto, who
            # cannot write its persistence into the test's private folder).
            f.write(f'per_listener_settings true\npersistence true\npersistence_location {folder}/\n'
                    f'max_queued_messages 100000\nuser {getpass.getuser()}\n'
                    f'listener {self.port} 127.0.0.1\nallow_anonymous true\n')
            if tls_listener:
                f.write(f'listener {self.tls_port} 127.0.0.1\n{tls_listener}\n')

    def start(self):
        self.process = subprocess.Popen([MOSQUITTO, '-c', self.config], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

        def accepting():
            with socket.socket() as s:
                return s.connect_ex(('127.0.0.1', self.port)) == 0
        wait_for(accepting, 10, 'mosquitto to listen')
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


def tls_listener(folder, username, password):
    """Lines of a TLS listener with a password: a self-signed certificate for 127.0.0.1 (openssl) and a
    password file (mosquitto_passwd) in `folder` -> (lines, the certificate: the client's CA file)."""
    cert, key, passwords = (os.path.join(folder, name) for name in ('cert.pem', 'key.pem', 'passwords'))
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
                    '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert], check=True,
                   capture_output=True)
    subprocess.run(['mosquitto_passwd', '-b', '-c', passwords, username, password], check=True, capture_output=True)
    return (f'certfile {cert}\nkeyfile {key}\nallow_anonymous false\npassword_file {passwords}', cert)


class Subscriber:
    """A QoS 1 subscriber with a persistent session on `topic`: the JSON messages in `messages`."""

    def __init__(self, port, topic='line3/verdicts'):
        self.messages = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f'test-{port}', clean_session=False)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_message = lambda client, userdata, m: self.messages.append(json.loads(m.payload))
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.connect('127.0.0.1', port)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, 'the subscriber to connect')

    def ids(self):
        return [m['id'] for m in self.messages]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class Receiver:
    """A webhook receiver on loopback: answers the statuses of `script` in turn, then 200 to every POST,
    and keeps [(status, headers, JSON body)]."""

    def __init__(self, script=()):
        self.script, self.requests = list(script), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                status = receiver.script.pop(0) if receiver.script else 200
                if callable(status):
                    status = status(body)
                receiver.requests.append((status, dict(self.headers), body))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b'no such field' if status == 422 else b'')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_port}/hooks/inspection'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self):
        return [body for status, _, body in self.requests if status == 200]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
