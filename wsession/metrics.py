"""Prometheus metrics for a :class:`~wsession.SessionManager` (the ``prometheus`` extra).

The counters live in ``manager.stats`` already; :class:`SessionMetrics` is a custom collector
that reads them when Prometheus scrapes, so sending and connecting cost nothing extra::

    from prometheus_client import CollectorRegistry
    from wsession.metrics import metrics_route, register_metrics

    registry = CollectorRegistry()            # or leave it out: the default REGISTRY
    register_metrics(manager, registry)
    app = Starlette(routes=[..., metrics_route("/metrics", registry=registry)], ...)

Exported metrics (``wsession`` is the default namespace):

- ``wsession_sessions_live`` (gauge): sessions open in this process now (``len(manager.local)``;
  endings of a lost worker's sessions healed here do not lower it).
- ``wsession_sessions_accepted_total`` (counter): connections whose connect hooks completed.
- ``wsession_sessions_refused_total{reason}``: refusals by label (``Refuse(label=...)``,
  ``hook_error``, ``hook_timeout``, limits...).
- ``wsession_sessions_ended_total{reason}``: endings by :class:`~wsession.EndReason` value.
- ``wsession_hook_duration_seconds{phase}`` (histogram): connect and disconnect hook durations.
- ``wsession_hook_errors_total``: hooks that raised (other than ``Refuse``) or timed out.
- ``wsession_sends_total{result}``: out-of-band sends by :class:`~wsession.SendResult` value.
- ``wsession_slow_consumers_total``: sessions closed because their backlog was full.
- ``wsession_dropped_messages_total``: messages dropped by the ``drop`` slow-consumer policy.
- ``wsession_sessions_expired_total``: sessions closed because their credentials expired.
- ``wsession_refreshes_total{result}``: ``manager.refresh`` outcomes (``ok``, ``failed``).
- ``wsession_revocations_total{kind}``: ``revoke_user`` / ``revoke_session`` calls (``user``,
  ``session``).
- ``wsession_revoked_sessions_total``: sessions those revocations closed (on any worker).
- ``wsession_sessions_detached`` (gauge): sessions waiting for their client to resume them
  (``resume_window``); ``wsession_sessions_detached_events_total``: times a session detached;
  ``wsession_sessions_resumed_total``: resumes; ``wsession_resume_failed_total{reason}``: resume
  attempts that got a new session (``invalid``, ``unknown``, ``replay_lost``, ``refused``).

Every number is per process: with ``uvicorn --workers N`` each worker counts its own
connections, and Prometheus should scrape every worker (prometheus-client's multiprocess mode
does not support custom collectors).

Importing ``wsession`` never imports ``prometheus_client``; importing this module does, and
raises ``ImportError`` with an install hint when it is missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ._exceptions import ConfigurationError
from ._types import Receive, Scope, Send

try:
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "wsession.metrics needs prometheus-client: pip install 'wsession[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from ._manager import SessionManager

__all__ = ["MetricsApp", "SessionMetrics", "metrics_app", "metrics_route", "register_metrics"]

_NAMESPACE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class SessionMetrics(Collector):
    """A Prometheus collector exposing one manager's counters, read at scrape time.

    It keeps no state of its own: every scrape reads ``manager.stats`` (cheap copies of a few
    integers and dicts), so nothing is paid per connection or per message. ``collect`` may run
    in another thread (``prometheus_client.start_http_server``); the values it reads are
    snapshots, each consistent on its own.

    Register it with :func:`register_metrics`, or yourself: ``registry.register(collector)``.

    Args:
        manager: the :class:`~wsession.SessionManager` whose ``stats`` are exported.
        namespace: prefix of every metric name (default ``"wsession"``); give another to
            export several managers into one registry.

    Raises:
        ConfigurationError: ``namespace`` is not a valid Prometheus metric-name prefix.
    """

    def __init__(self, manager: SessionManager, *, namespace: str = "wsession") -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise ConfigurationError(
                f"namespace: must match [a-zA-Z_:][a-zA-Z0-9_:]*, got {namespace!r}"
            )
        self.manager = manager
        self.namespace = namespace

    def collect(self) -> Iterator[Metric]:
        """Yield the current value of every metric (called by the registry at each scrape)."""
        ns = self.namespace
        stats = self.manager.stats
        # Snapshot the mutable parts first: dict()/list() copies are atomic under the GIL.
        refused_by = dict(stats.refused_by)
        ended_by = dict(stats.ended_by)
        sends = dict(stats.sends)
        refreshes = dict(stats.refreshes)
        revocations = dict(stats.revocations)
        resume_failed = dict(stats.resume_failed)
        hooks = {phase: (h.cumulative(), h.total) for phase, h in stats.hook_seconds.items()}

        yield GaugeMetricFamily(
            f"{ns}_sessions_live",
            "Sessions open in this process now (its connections, whatever the registry).",
            # Counted, not derived from accepted - ended: a cluster registry ends a lost
            # worker's sessions here too (node lost), which were never accepted here.
            value=len(self.manager.local),
        )
        yield CounterMetricFamily(
            f"{ns}_sessions_accepted",
            "Connections whose connect hooks completed (admitted to the app).",
            value=stats.accepted,
        )
        yield _labelled(
            f"{ns}_sessions_refused",
            "Connections refused before the app ran, by reason label.",
            "reason",
            refused_by,
        )
        yield _labelled(
            f"{ns}_sessions_ended",
            "Sessions whose disconnect hooks ran, by end reason.",
            "reason",
            ended_by,
        )
        histogram = HistogramMetricFamily(
            f"{ns}_hook_duration_seconds",
            "Duration of connect and disconnect hooks, in seconds.",
            labels=["phase"],
        )
        for phase, (cumulative, total) in sorted(hooks.items()):
            buckets = [(_le(bound), float(n)) for bound, n in cumulative]
            histogram.add_metric([phase], buckets, total)
        yield histogram
        yield CounterMetricFamily(
            f"{ns}_hook_errors",
            "Hooks that raised (other than Refuse) or timed out.",
            value=stats.hook_errors,
        )
        yield _labelled(
            f"{ns}_sends",
            "Out-of-band sends (send, send_group, broadcast...), by result.",
            "result",
            sends,
        )
        yield CounterMetricFamily(
            f"{ns}_slow_consumers",
            "Sessions closed because their out-of-band backlog was full.",
            value=stats.slow_consumers,
        )
        yield CounterMetricFamily(
            f"{ns}_dropped_messages",
            "Out-of-band messages dropped by the 'drop' slow-consumer policy.",
            value=stats.dropped,
        )
        yield CounterMetricFamily(
            f"{ns}_sessions_expired",
            "Sessions closed because their credentials expired (expires_at + expiry_grace).",
            value=stats.expired,
        )
        yield _labelled(
            f"{ns}_refreshes",
            "In-band credential refreshes (manager.refresh), by result.",
            "result",
            refreshes,
        )
        yield _labelled(
            f"{ns}_revocations",
            "revoke_user / revoke_session calls made in this process, by kind.",
            "kind",
            revocations,
        )
        yield CounterMetricFamily(
            f"{ns}_revoked_sessions",
            "Sessions closed by revocations made in this process (on any worker).",
            value=stats.revoked,
        )
        yield GaugeMetricFamily(
            f"{ns}_sessions_detached",
            "Sessions of this process waiting for their client to resume them (resume_window).",
            value=len(self.manager.detached),
        )
        yield CounterMetricFamily(
            f"{ns}_sessions_detached_events",
            "Times a session's connection was lost and the session detached instead of ending.",
            value=stats.detached,
        )
        yield CounterMetricFamily(
            f"{ns}_sessions_resumed",
            "Times a new connection resumed a detached session.",
            value=stats.resumed,
        )
        yield _labelled(
            f"{ns}_resume_failed",
            "Resume attempts that got a new session instead, by reason.",
            "reason",
            resume_failed,
        )

    def describe(self) -> Iterable[Metric]:
        """The metric families this collector yields, so registries detect name clashes."""
        return list(self.collect())


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def _labelled(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted((str(k), v) for k, v in counts.items()):
        family.add_metric([value], count)
    return family


def register_metrics(
    manager: SessionManager,
    registry: CollectorRegistry | None = None,
    *,
    namespace: str = "wsession",
) -> SessionMetrics:
    """Create a :class:`SessionMetrics` for ``manager`` and register it.

    Args:
        manager: the :class:`~wsession.SessionManager` to export.
        registry: where to register; ``prometheus_client.REGISTRY`` (the default registry)
            when omitted. Use a fresh ``CollectorRegistry()`` per app when one process builds
            several apps (tests), since a name can be registered only once per registry.
        namespace: prefix of every metric name.

    Returns:
        The registered collector (``registry.unregister(it)`` removes it).

    Raises:
        ConfigurationError: a bad ``namespace``, or ``registry`` already has metrics with these
            names (another manager registered with the same namespace).
    """
    collector = SessionMetrics(manager, namespace=namespace)
    target = REGISTRY if registry is None else registry
    try:
        target.register(collector)
    except ValueError as exc:
        raise ConfigurationError(
            f"registry: {exc}; give each manager its own namespace or registry"
        ) from None
    return collector


def _render(registry: CollectorRegistry, accept: str) -> Response:
    encoder, content_type = choose_encoder(accept)
    return Response(encoder(registry), headers={"Content-Type": content_type})


class MetricsApp:
    """An ASGI app answering ``GET`` (and ``HEAD``) with the registry's metrics.

    The body is ``prometheus_client.generate_latest(registry)`` in the text format (or
    OpenMetrics when the scraper asks for it in ``Accept``), with the matching
    ``Content-Type``. Other methods get 405. Made by :func:`metrics_app`.

    Args:
        registry: the registry to serve; ``prometheus_client.REGISTRY`` when omitted.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request (other scope types are ignored)."""
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response: Response
        if request.method not in ("GET", "HEAD"):
            response = PlainTextResponse(
                "Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"}
            )
        else:
            response = _render(self.registry, request.headers.get("accept", ""))
        await response(scope, receive, send)


def metrics_app(registry: CollectorRegistry | None = None) -> MetricsApp:
    """An ASGI app serving the registry's metrics, for wherever an ASGI app is expected:
    ``Route("/metrics", metrics_app(registry))``, or FastAPI's
    ``app.add_route("/metrics", metrics_app(registry))``.

    Args:
        registry: the registry to serve; ``prometheus_client.REGISTRY`` when omitted.

    Returns:
        A :class:`MetricsApp`.
    """
    return MetricsApp(registry)


def metrics_route(path: str = "/metrics", *, registry: CollectorRegistry | None = None) -> Route:
    """A Starlette ``Route`` serving the registry's metrics at ``path`` (``GET`` and ``HEAD``).

    FastAPI: ``app.router.routes.append(metrics_route())`` or
    ``app.add_route("/metrics", metrics_app(registry))``.

    Args:
        path: the URL path (default ``/metrics``).
        registry: the registry to serve; ``prometheus_client.REGISTRY`` when omitted.
    """
    target = REGISTRY if registry is None else registry

    async def metrics(request: Request) -> Response:
        return _render(target, request.headers.get("accept", ""))

    return Route(path, metrics, methods=["GET"], name="metrics")
