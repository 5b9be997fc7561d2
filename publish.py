"""Telling the line: every verdict to MQTT brokers and webhooks, through the durable outbox, without
holding the inspection.

    report = publish.LineReport(detector, 'watch:/line3/in', Publisher(['mqtt://broker:1883/line3/verdicts'],
                                                                       'line3.outbox'))
    for result in detector.inspect(paths):
        report.scored(result, path=result.path)     # a message, the metrics, the drift and score-shift windows
    report.close()                                  # waits a little for the outbox to drain

- `parse_destination`: `--publish URL`. mqtt:// and mqtts:// (port 1883 / 8883; the topic is the path,
  mqtt://broker:1883/line3/verdicts -> line3/verdicts; ?client_id=NAME or $MAHALANOBISAD_MQTT_CLIENT_ID,
  else a random one), http:// and https:// webhooks. Credentials from the URL (user:password@) or the
  environment ($MAHALANOBISAD_MQTT_USERNAME / _PASSWORD; $MAHALANOBISAD_WEBHOOK_TOKEN as a bearer
  token); logs and metrics show a destination as scheme://host:port/path only (`Destination.shown`).
- `Publisher`: each message is committed to the outbox (outbox.Outbox) before anything is sent; one
  sender thread per destination sends in outbox order and removes a message only when it is
  acknowledged: MQTT QoS 1 (paho-mqtt), removed at the broker's PUBACK, up to IN_FLIGHT unacknowledged at
  once, reconnecting with backoff (paho resends the unacknowledged ones); a webhook gets one JSON POST
  per message (requests, timeouts), removed at a 2xx; a 5xx, 408, 425, 429, a timeout or no connection
  is retried with doubling backoff (Retry-After honoured) while the messages behind it wait; any other
  answer (a 3xx or 4xx no retry can fix) is logged and the message dropped. At-least-once: a message
  may arrive twice (a PUBACK or 2xx lost on the way), never not at all while the outbox holds it;
  receivers drop duplicates by its `id` (also the webhook's Idempotency-Key header).
- `LineReport`: what one run tells the line of each image (the message, the metrics, the drift
  window's warnings). The message schema is in docs/line_integration.md.
"""
import collections
import datetime
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid

import paho.mqtt.client as mqtt
import requests

import conditions
import metrics
import thresholds
from errors import UsageError
from outbox import DEFAULT_MAX_MB, Outbox

logger = logging.getLogger('mahalanobisad')

SCHEMA = 'mahalanobisad/1'  # each message's "schema": its fields change only with this name
DEFAULT_PORTS = {'mqtt': 1883, 'mqtts': 8883, 'http': 80, 'https': 443}
MQTT_USERNAME_ENV, MQTT_PASSWORD_ENV = 'MAHALANOBISAD_MQTT_USERNAME', 'MAHALANOBISAD_MQTT_PASSWORD'
MQTT_CLIENT_ID_ENV, MQTT_CA_ENV = 'MAHALANOBISAD_MQTT_CLIENT_ID', 'MAHALANOBISAD_MQTT_CA'
WEBHOOK_TOKEN_ENV = 'MAHALANOBISAD_WEBHOOK_TOKEN'
IN_FLIGHT = 100                  # MQTT messages published and not yet acknowledged, at most
RETRY_S = (0.5, 10.0)            # first and longest wait before trying a receiver again (doubling): a receiver
                                 # that is back gets its messages within 10 s, for one try per 10 s while down
WEBHOOK_TIMEOUT_S = (3.05, 10.0)  # connect, read
RETRYABLE_STATUS = (408, 425, 429)  # the 4xx a later try can fix (and every 5xx)
IDLE_POLL_S = 0.5                # a sender looks at the outbox at least this often
RETRY_LOG_EVERY_S = 60.0         # while a webhook fails, a warning this often
FLUSH_S = 5.0                    # at the end of a run, the longest wait for the outbox to drain


# ----------------------------------------------------------------------------------------------
# destinations
# ----------------------------------------------------------------------------------------------

class Destination:
    """A parsed --publish URL. shown: scheme://host:port/path, what logs and metrics say (no
    credentials, no query); the rest is what the sender needs: host, port, tls, topic (MQTT) or url
    (a webhook's, without credentials), username / password / token (never shown), client_id."""

    def __init__(self, scheme, host, port, topic=None, url=None, username=None, password=None, token=None,
                 client_id=None, shown=None):
        self.scheme, self.host, self.port, self.topic, self.url = scheme, host, port, topic, url
        self.username, self.password, self.token, self.client_id, self.shown = (username, password, token,
                                                                                  client_id, shown)

    @property
    def mqtt(self):
        return self.scheme in ('mqtt', 'mqtts')

    @property
    def tls(self):
        return self.scheme in ('mqtts', 'https')

    def __repr__(self):  # never the credentials
        return f'Destination({self.shown})'


def parse_destination(url):
    """A --publish URL -> Destination; UsageError saying what is wrong (never showing its credentials)."""
    schemes = ', '.join(s + '://' for s in DEFAULT_PORTS)
    if not isinstance(url, str) or not url.strip() or any(c.isspace() or ord(c) < 32 for c in url):
        raise UsageError(f'a publish URL has no spaces or control characters and starts with one of {schemes}')
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f'not a valid publish URL ({e})') from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UsageError(f'{"a URL starting " + scheme + "://" if scheme else "a URL without a scheme"} cannot be '
                         f'published to: use one of {schemes}')
    if not parts.hostname:
        raise UsageError(f'{scheme}:// URL without a host')
    if '#' in url:  # a fragment for a URL, a wildcard for MQTT: neither can be sent to
        raise UsageError(f'{scheme}://{parts.hostname}...: a URL to publish to has no "#"')
    host, port = parts.hostname, port or DEFAULT_PORTS[scheme]
    shown_host = f'[{host}]' if ':' in host else host
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if scheme in ('mqtt', 'mqtts'):
        topic = urllib.parse.unquote(parts.path[1:])
        if not topic or '+' in topic or '#' in topic or '\x00' in topic:
            raise UsageError(f'{scheme}://{shown_host}:{port}: the path must be an MQTT topic without wildcards '
                             '(mqtt://broker:1883/line3/verdicts)')
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {'client_id'}:
            raise UsageError(f'{scheme}://{shown_host}:{port}/{topic}: the only query parameter is client_id')
        client_id = (query.get('client_id') or [os.environ.get(MQTT_CLIENT_ID_ENV)])[0] or \
            f'mahalanobisad-{uuid.uuid4().hex[:12]}'
        return Destination(scheme, host, port, topic=topic, client_id=client_id,
                           username=username if username is not None else os.environ.get(MQTT_USERNAME_ENV),
                           password=password if password is not None else os.environ.get(MQTT_PASSWORD_ENV),
                           shown=f'{scheme}://{shown_host}:{port}/{topic}')
    path = parts.path or '/'
    webhook = urllib.parse.urlunsplit((scheme, f'{shown_host}:{port}', path, parts.query, ''))
    return Destination(scheme, host, port, url=webhook, username=username, password=password,
                       token=os.environ.get(WEBHOOK_TOKEN_ENV) or None, shown=f'{scheme}://{shown_host}:{port}{path}')


# ----------------------------------------------------------------------------------------------
# senders: one thread per destination, reading the outbox in order
# ----------------------------------------------------------------------------------------------

class _Sender:
    """A destination's sender thread over the outbox. wake(): new messages are waiting."""

    def __init__(self, destination, outbox, retry_s, metrics):
        self.destination, self.outbox, self.retry_s, self.metrics = destination, outbox, retry_s, metrics
        self._wake, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name=f'publish {destination.shown}', daemon=True)

    def start(self):
        self.thread.start()

    def wake(self):
        self._wake.set()

    def stop(self, timeout=5.0):
        self.stopping.set()
        self._wake.set()
        self.thread.join(timeout)

    @property
    def healthy(self):
        """Whether the receiver is taking messages now (close() waits for those only)."""
        raise NotImplementedError

    def _acknowledged(self, seqs):
        self.outbox.remove(seqs)
        if self.metrics and seqs:
            self.metrics.sent.labels(self.destination.shown).inc(len(seqs))

    def _run(self):
        raise NotImplementedError


class MqttSender(_Sender):
    """QoS 1 to a broker (paho-mqtt, its network loop on its own thread): publishes up to IN_FLIGHT
    messages ahead of their PUBACKs and removes each at its PUBACK. Starts whether the broker answers or
    not (the messages wait in the outbox); reconnects with backoff, and paho resends what was in flight."""

    def __init__(self, destination, outbox, retry_s=RETRY_S, metrics=None):
        super().__init__(destination, outbox, retry_s, metrics)
        self.connected = threading.Event()
        self._acks = collections.deque()
        self._trouble = None  # what the last connection problem was, logged once
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=destination.client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        if destination.username is not None:
            client.username_pw_set(destination.username, destination.password)
        if destination.tls:
            client.tls_set(ca_certs=os.environ.get(MQTT_CA_ENV) or None)
        client.reconnect_delay_set(*retry_s)
        client.max_inflight_messages_set(IN_FLIGHT)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_connect_fail, client.on_publish = self._on_connect_fail, self._on_publish
        self.client = client

    def start(self):
        self.client.connect_async(self.destination.host, self.destination.port, keepalive=30)
        self.client.loop_start()
        super().start()

    def stop(self, timeout=5.0):
        super().stop(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def _problem(self, what):
        if self._trouble is None:
            logger.warning('%s: %s; messages wait in the outbox %s and are sent when it answers',
                           self.destination.shown, what, self.outbox.path)
        self._trouble = what

    @property
    def healthy(self):  # connected, or connecting for the first time
        return self.connected.is_set() or self._trouble is None

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:  # e.g. bad credentials: paho tries again later
            self._problem(f'the broker refused the connection ({reason_code})')
            return
        logger.info('%s: connected%s', self.destination.shown, ' again' if self._trouble else '')
        self._trouble = None
        self.connected.set()
        self.wake()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self.stopping.is_set():
            self._problem(f'connection lost ({reason_code})')

    def _on_connect_fail(self, client, userdata):
        self._problem('cannot reach the broker')

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._acks.append(mid)
        self.wake()

    def _run(self):
        in_flight, after = {}, 0  # paho's message id -> outbox seq; the last seq published
        while not self.stopping.is_set():
            self._wake.clear()
            acknowledged = []
            while self._acks:
                seq = in_flight.pop(self._acks.popleft(), None)
                if seq is not None:
                    acknowledged.append(seq)
            self._acknowledged(acknowledged)
            if self.connected.is_set() and len(in_flight) < IN_FLIGHT:
                for seq, _, body in self.outbox.pending(self.destination.shown, after, IN_FLIGHT - len(in_flight)):
                    info = self.client.publish(self.destination.topic, body, qos=1)
                    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho queued it
                        break
                    in_flight[info.mid], after = seq, seq
            self._wake.wait(IDLE_POLL_S)


class WebhookSender(_Sender):
    """One JSON POST per message, in outbox order (requests, one kept-alive session)."""

    def __init__(self, destination, outbox, retry_s=RETRY_S, metrics=None):
        super().__init__(destination, outbox, retry_s, metrics)
        self._failure = None  # the last failed try, in words
        self.session = requests.Session()
        self.session.headers.update({'Content-Type': 'application/json', 'User-Agent': 'mahalanobisad'})
        if destination.token:
            self.session.headers['Authorization'] = f'Bearer {destination.token}'
        if destination.username is not None:
            self.session.auth = (destination.username, destination.password or '')

    @property
    def healthy(self):
        return self._failure is None

    def stop(self, timeout=5.0):
        super().stop(timeout)
        self.session.close()

    def _run(self):
        after, failures, logged = 0, 0, 0.0
        while not self.stopping.is_set():
            self._wake.clear()
            pending = self.outbox.pending(self.destination.shown, after, 1)
            if not pending:
                self._wake.wait(IDLE_POLL_S)
                continue
            wait = self._post(*pending[0])
            if wait is None:
                if failures:
                    logger.info('%s answers again (after %d failed tries)', self.destination.shown, failures)
                after, failures, self._failure = pending[0][0], 0, None
                continue
            failures += 1
            if failures == 1 or time.monotonic() - logged >= RETRY_LOG_EVERY_S:
                logger.warning('%s: %s; tried again with backoff, the messages behind it wait in the outbox %s '
                               '(%d failed tries)', self.destination.shown, self._failure, self.outbox.path, failures)
                logged = time.monotonic()
            self.stopping.wait(min(wait or self.retry_s[0] * 2 ** (failures - 1), self.retry_s[1]))

    def _post(self, seq, message_id, body):
        """POST one message -> None when it is done with (acknowledged, or dropped as unfixable), else
        the seconds to wait before trying it again (0: the backoff's)."""
        shown = self.destination.shown
        try:
            answer = self.session.post(self.destination.url, data=body.encode(), timeout=WEBHOOK_TIMEOUT_S,
                                       allow_redirects=False, headers={'Idempotency-Key': message_id})
        except requests.RequestException as e:  # the exception's text may carry the URL's query: not logged
            self._failure = f'no answer ({type(e).__name__})'
            return 0
        if 200 <= answer.status_code < 300:
            self._acknowledged([seq])
            return None
        if answer.status_code >= 500 or answer.status_code in RETRYABLE_STATUS:
            self._failure = f'answered {answer.status_code} {answer.reason}'
            retry_after = answer.headers.get('Retry-After', '')
            return float(retry_after) if retry_after.isdigit() else 0
        text = ' '.join(answer.text[:200].split())
        logger.error('%s answered %d %s%s: message %s dropped (retrying cannot fix that answer)', shown,
                     answer.status_code, answer.reason, f' ({text})' if text else '', message_id)
        self.outbox.remove([seq])
        if self.metrics:
            self.metrics.rejected.labels(shown).inc()
        return None


class Publisher:
    """--publish: messages to `urls` (or Destinations) through the outbox file `outbox_path` (see the
    module). publish(message) returns at once; close() waits up to FLUSH_S for the outbox to drain
    towards the receivers that take messages now, and stops the senders; whatever is unacknowledged
    stays in the outbox for the next run. A context manager: leaving it closes."""

    def __init__(self, urls, outbox_path, max_mb=DEFAULT_MAX_MB, retry_s=RETRY_S, metrics=None):
        self.destinations = [d if isinstance(d, Destination) else parse_destination(d) for d in urls]
        shown = [d.shown for d in self.destinations]
        if not shown or len(set(shown)) != len(shown):
            raise UsageError('publish to at least one destination, each once')
        self.metrics = metrics
        self.outbox = Outbox(outbox_path, shown, max_mb)
        try:
            self.senders = [(MqttSender if d.mqtt else WebhookSender)(d, self.outbox, retry_s, metrics)
                            for d in self.destinations]
        except BaseException:  # e.g. an mqtts:// CA file that cannot be read
            self.outbox.close()
            raise
        if metrics:
            metrics.watch_outbox(self.outbox, shown)
        for destination, sender in zip(self.destinations, self.senders):
            logger.info('publishing to %s%s through the outbox %s', destination.shown,
                        ' (MQTT QoS 1)' if destination.mqtt else ' (webhook)', self.outbox.path)
            sender.start()

    def publish(self, message):
        """Store `message` (a dict with an 'id') in the outbox for every destination -> whether it was
        stored (False: the outbox or the disk is full; counted, logged, and the run goes on)."""
        stored = self.outbox.put(message['id'], json.dumps(message))
        if stored:
            for sender in self.senders:
                sender.wake()
        elif self.metrics:
            self.metrics.lost.inc()
        return stored

    def waiting(self):
        """Messages not yet acknowledged, over this run's destinations."""
        return sum(n for d, n in self.outbox.depth().items() if d in {s.shown for s in self.destinations})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _draining(self):
        """Whether messages wait for a receiver that is taking them."""
        depth = self.outbox.depth()
        return any(depth.get(sender.destination.shown) and sender.healthy for sender in self.senders)

    def close(self, flush_s=FLUSH_S):
        try:
            deadline = time.monotonic() + flush_s
            while self._draining() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for sender in self.senders:
                sender.stop()
            waiting = self.waiting()
            if waiting:
                logger.warning('%d messages not acknowledged yet stay in the outbox %s: the next run with it sends '
                               'them first', waiting, self.outbox.path)
            if self.outbox.lost:
                logger.warning('%d messages could not be stored in the outbox %s (full) and were not sent',
                               self.outbox.lost, self.outbox.path)
            self.outbox.close()


# ----------------------------------------------------------------------------------------------
# messages and what a run tells the line
# ----------------------------------------------------------------------------------------------

def message(kind, source, **fields):
    """A message of `kind` ('verdict', 'drift', 'score_shift', 'summary'): schema, type, a fresh id, time (UTC,
    ISO 8601), host and source, then `fields`."""
    return {'schema': SCHEMA, 'type': kind, 'id': str(uuid.uuid4()),
            'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds'),
            'host': socket.gethostname(), 'source': source, **fields}


class LineReport:
    """What one run tells the line of each image: a message through `publisher` (if any), the metrics
    (`metrics`, if any) and the warnings of the conditions-drift and score-shift windows (logged,
    published, and returned for the caller's JSON Lines). source: what the run inspects, as messages
    say it ('watch:DIR', 'video:SRC', 'console'). A context manager: leaving it closes the publisher."""

    def __init__(self, detector, source, publisher=None, metrics=None, drift_window=conditions.DRIFT_WINDOW,
                 shift_window=conditions.SHIFT_WINDOW):
        self.detector, self.source, self.publisher, self.metrics = detector, source, publisher, metrics
        self.window = conditions.DriftWindow(drift_window)
        self.shift = conditions.ScoreShiftWindow(shift_window)
        self._shift_reference = (None, None)  # (the detector, the median of its held-out scores)
        self.drifted = 0
        self._lock = threading.Lock()  # the console reports from several request threads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _publish(self, kind, **fields):
        if self.publisher:
            self.publisher.publish(message(kind, self.source, **fields))

    def scored(self, result, latency_s=None, **where):
        """A scored detector.Inspection (where: path=... or frame=..., time_s=...) -> the warnings it raised,
        as JSON Lines records: [] or [{'drift': event}] (conditions.DriftWindow) and/or [{'score_shift':
        event}] (conditions.ScoreShiftWindow)."""
        judged = result.conditions
        with self._lock:
            if self.metrics:
                self.metrics.images.inc()
                self.metrics.anomalies.inc(bool(result.anomaly))
                self.metrics.score.observe(result.score)
                if latency_s is not None:
                    self.metrics.latency.observe(latency_s)
            self.drifted += bool(judged and judged.drift)
            if self.metrics and judged and judged.drift:
                self.metrics.drifted.inc()
            self._publish('verdict', **where, score=result.score, threshold=self.detector.threshold_,
                          verdict='ANOMALY' if result.anomaly else 'normal', anomaly=bool(result.anomaly),
                          conditions=judged.to_json() if judged else None,
                          **({} if latency_s is None else {'latency_s': round(latency_s, 4)}))
            records = []
            drift = self.window.add(judged) if judged else None
            if drift is not None:
                self._drift_warning(drift)
                records.append({'drift': drift})
            shift = None if result.anomaly else self.shift.add(result.score, self._held_out_median())  # judged normal
            if shift is not None:
                self._shift_warning(shift)
                records.append({'score_shift': shift})
            return records

    def _held_out_median(self):
        """The score-shift window's reference for the detector now (the console swaps the detector when a
        review is applied or undone), computed once per detector."""
        detector, median = self._shift_reference
        if detector is not self.detector:
            median = thresholds.conformal_threshold(self.detector.holdout_.image, 0.5)[0]
            self._shift_reference = (self.detector, median)
        return median

    def _drift_warning(self, event):
        if self.metrics:
            self.metrics.drift_warning.set(event['state'] == 'started')
        outside = ', '.join(f'{name} {count}' for name, count in event['outside'].items())
        if event['state'] == 'started':
            logger.warning('conditions drift: %d of the last %d images are outside the training images\' range '
                           '(%s): check the light, the focus and the camera before trusting the verdicts',
                           event['drifted'], event['window'], outside)
        else:
            logger.info('conditions back in range: %d of the last %d images outside', event['drifted'],
                        event['window'])
        self._publish('drift', drift=event)

    def _shift_warning(self, event):
        if self.metrics:
            self.metrics.score_shift_warning.set(event['state'] == 'started')
        if event['state'] == 'started':
            logger.warning('scores shifted: %d of the last %d images scored above the median of the training images\' '
                           'held-out scores (normal images like them: about half; p = %.2g): the threshold\'s '
                           'false-positive rate does not hold for these images. Check what changed (session, '
                           'material, light); teach good images of it (--add_good) or fit again',
                           event['above_median'], event['window'], event['p'])
        else:
            logger.info('scores back to the training images\': %d of the last %d above their held-out median',
                        event['above_median'], event['window'])
        self._publish('score_shift', score_shift=event)

    def failed(self, error, **where):
        """An input that could not be read or scored (why: `error`): counted and published."""
        with self._lock:
            if self.metrics:
                self.metrics.failures.inc()
            self._publish('verdict', **where, score=None, threshold=self.detector.threshold_, verdict='error',
                          anomaly=None, error=error)

    def finished(self, summary):
        """The run's summary, published as the last message."""
        self._publish('summary', summary=summary)

    def close(self):
        """Close the publisher (waiting up to FLUSH_S for the outbox to drain) and the metrics server."""
        try:
            if self.publisher:
                self.publisher.close()
        finally:
            if self.metrics:
                self.metrics.close()


def report_from_args(args, detector, source, default_outbox, with_metrics=False):
    """The LineReport of the flags of cli.add_line_arguments for `detector`: a Publisher on --publish
    (outbox --outbox, else default_outbox), Metrics served on --metrics_port (also without a port
    where with_metrics: the console serves them itself)."""
    served = args.metrics_port is not None
    report = LineReport(detector, source, drift_window=args.drift_window, shift_window=args.shift_window)
    # The report's detector, not this one: the console swaps it after a review is applied or undone.
    line_metrics = metrics.Metrics(lambda: report.detector.threshold_) if served or with_metrics else None
    if served:
        line_metrics.serve(args.metrics_port, args.metrics_host)
        logger.info('metrics on http://%s:%d/metrics', args.metrics_host, args.metrics_port)
    try:
        publisher = (Publisher(args.publish, args.outbox or default_outbox, args.outbox_max_mb, metrics=line_metrics)
                     if args.publish else None)
    except BaseException:
        if line_metrics:
            line_metrics.close()
        raise
    report.publisher, report.metrics = publisher, line_metrics
    return report
