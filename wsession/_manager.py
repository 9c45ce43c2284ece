"""SessionManager: hooks, registry, settings and counters shared by every connection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from secrets import token_bytes
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, Self, TypeVar

import anyio
from pydantic import BaseModel, ValidationError

from ._admission import Admission
from ._config import Settings, validate_model
from ._delivery import SendResult, to_message
from ._exceptions import ConfigurationError, LimitExceeded, Refuse, RegistryUnavailable
from ._expiry import RefreshHook
from ._ids import new_connection_id
from ._log import log_warning
from ._presence import Presence
from ._resume import Resumption
from ._session import EndReason, Session
from ._stats import Stats
from .backends import MemoryRegistry, SessionRegistry
from .backends._base import SessionFilter

Hook = Callable[[Session], Awaitable[None] | None]
"""A connect or disconnect hook: ``def hook(session)`` or ``async def hook(session)``."""

H = TypeVar("H", bound=Hook)
R = TypeVar("R", bound=RefreshHook)


class SessionManager:
    """Everything the middleware needs to manage sessions: hooks, registry and settings.

    Create one per app, register hooks on it, and give it to
    :class:`~wsession.WSessionMiddleware`. App code uses it to look sessions up.

    Args:
        data_model: a pydantic model for ``session.data``; every field needs a default (connect
            hooks fill them in). Without it, ``session.data`` is a ``dict``.
        registry: where live sessions are kept; a new :class:`~wsession.MemoryRegistry` by
            default.
        on_connect: connect hooks, run in order before the app sees the connection. A hook may
            raise :class:`~wsession.Refuse` to refuse it.
        on_disconnect: disconnect hooks, run in reverse order exactly once per session whose
            connect hooks completed, however it ended.
        on_refresh: refresh hooks (see :meth:`on_refresh`), run in order by :meth:`refresh`.
        on_detach: detach hooks (see :meth:`on_detach`), with ``resume_window``.
        on_resume: resume hooks (see :meth:`on_resume`), with ``resume_window``.
        id_factory: makes connection ids (default: 132 random bits, URL-safe). Ids must be
            unguessable and unique; a duplicate of a live id is an error.
        **settings: fields of :class:`~wsession.Settings` (``connect_timeout``, ...).

    Raises:
        ConfigurationError: a bad argument; the message names it.
    """

    def __init__(
        self,
        *,
        data_model: type[BaseModel] | None = None,
        registry: SessionRegistry | None = None,
        on_connect: Sequence[Hook] = (),
        on_disconnect: Sequence[Hook] = (),
        on_refresh: Sequence[RefreshHook] = (),
        on_detach: Sequence[Hook] = (),
        on_resume: Sequence[Hook] = (),
        id_factory: Callable[[], str] | None = None,
        **settings: Any,
    ) -> None:
        self.settings: Settings = validate_model(Settings, "SessionManager", settings)
        """The validated :class:`~wsession.Settings` (frozen)."""
        self.data_model = _check_data_model(data_model)
        """The pydantic model every session's ``data`` starts as, or ``None`` (a ``dict``)."""
        if registry is not None and not isinstance(registry, SessionRegistry):
            raise ConfigurationError(
                f"registry: expected a SessionRegistry (MemoryRegistry, RedisRegistry, ...), "
                f"got {type(registry).__name__}"
            )
        self.registry: SessionRegistry = registry if registry is not None else MemoryRegistry()
        """Where live sessions are kept (the whole cluster's with a cluster registry)."""
        self.registry.bind(self)
        if id_factory is not None and not callable(id_factory):
            raise ConfigurationError(f"id_factory: must be callable, got {id_factory!r}")
        self.id_factory: Callable[[], str] = id_factory or new_connection_id
        """Makes connection ids (:func:`~wsession.new_connection_id` by default)."""
        self.stats = Stats()
        """This process's lifetime counters (:class:`~wsession.Stats`)."""
        self.admission = Admission(self.settings)
        """The admission checks (Origin, Host, limits, draining) the middleware runs before the
        connect hooks; internal, not meant to be called by apps."""
        self.local: dict[str, Session] = {}
        """This worker's live sessions (whatever the registry), by id."""
        self._local_changed: asyncio.Event | None = None
        self._presence: Presence | None = None  # made on first use: free for apps without it
        self._signal_handlers: dict[int, Any] = {}
        self._drain_task: asyncio.Task[None] | None = None
        self._entered = False
        self._start_lock: anyio.Lock | None = None
        self.started_lazily = False
        """True when the first connection entered the manager because no lifespan had (daphne
        sends no lifespan scope); such a manager is never exited (see :meth:`_ensure_started`)."""
        self.connect_hooks: tuple[Hook, ...] = tuple(
            _check_hook(hook, f"on_connect[{i}]") for i, hook in enumerate(on_connect)
        )
        """Connect hooks, in the order they run (add more with :meth:`on_connect`)."""
        self.disconnect_hooks: tuple[Hook, ...] = tuple(
            _check_hook(hook, f"on_disconnect[{i}]") for i, hook in enumerate(on_disconnect)
        )
        """Disconnect hooks, in registration order (they run in reverse)."""
        self.refresh_hooks: tuple[RefreshHook, ...] = tuple(
            _check_hook(hook, f"on_refresh[{i}]") for i, hook in enumerate(on_refresh)
        )
        """Refresh hooks, in the order they run (add more with :meth:`on_refresh`)."""
        self.detach_hooks: tuple[Hook, ...] = tuple(
            _check_hook(hook, f"on_detach[{i}]") for i, hook in enumerate(on_detach)
        )
        """Detach hooks, in the order they run (add more with :meth:`on_detach`)."""
        self.resume_hooks: tuple[Hook, ...] = tuple(
            _check_hook(hook, f"on_resume[{i}]") for i, hook in enumerate(on_resume)
        )
        """Resume hooks, in the order they run (add more with :meth:`on_resume`)."""
        self.resumption: Resumption | None = None
        """Session resumption (``resume_window``; internal: apps use :attr:`detached`,
        :attr:`Session.resume_token <wsession.Session.resume_token>` and the hooks)."""
        if self.settings.resume_window > 0:
            secret = self.settings.resume_secret
            self.resumption = Resumption(
                self,
                secret.get_secret_value().encode() if secret is not None else token_bytes(32),
            )
            # A registry with a durable journal (RedisRegistry) keeps numbered messages and
            # detached sessions where every worker can resume them.
            resume_store = getattr(self.registry, "resume_store", None)
            if callable(resume_store):
                self.resumption.store = resume_store()
                self.resumption.check_mac = secret is not None

    # -- hook registration ------------------------------------------------------------------

    def on_connect(self, hook: H) -> H:
        """Decorator: add a connect hook (after those already registered)."""
        self.connect_hooks = (*self.connect_hooks, _check_hook(hook, "on_connect"))
        return hook

    def on_disconnect(self, hook: H) -> H:
        """Decorator: add a disconnect hook (it runs before those already registered)."""
        self.disconnect_hooks = (*self.disconnect_hooks, _check_hook(hook, "on_disconnect"))
        return hook

    def on_refresh(self, hook: R) -> R:
        """Decorator: add a refresh hook (after those already registered).

        ``async def hook(session, credential) -> datetime | None`` (or a sync one) validates the
        new ``credential`` for ``session`` and returns when it expires (timezone-aware), or
        ``None`` / raises :class:`~wsession.Refuse` to refuse it. It must check that the
        credential belongs to ``session.user_key``: the user key cannot change through a refresh
        (assigning it raises :class:`~wsession.SessionStateError`, which refuses the refresh).
        """
        self.refresh_hooks = (*self.refresh_hooks, _check_hook(hook, "on_refresh"))
        return hook

    def on_detach(self, hook: H) -> H:
        """Decorator: add a detach hook (after those already registered).

        ``hook(session)`` (sync or async) runs when a session's connection is lost and the
        session becomes detached (``resume_window``), with ``session.end_reason`` saying how the
        connection ended. A notification: failures are logged and counted, nothing is refused.
        The disconnect hooks still run once, when the session really ends.
        """
        self.detach_hooks = (*self.detach_hooks, _check_hook(hook, "on_detach"))
        return hook

    def on_resume(self, hook: H) -> H:
        """Decorator: add a resume hook (after those already registered).

        ``hook(session)`` (sync or async) runs, in order and together bounded by
        ``connect_timeout``, when a new connection presents a detached session's resume token,
        before it takes the session over. ``session.headers``, ``query_params`` and ``client``
        are the new handshake's by then: authenticate it as a connect hook would (a resume never
        skips authentication) and raise :class:`~wsession.Refuse` to refuse it. A refused resume
        leaves the session detached for the rest of its window, with the same token. Connect
        hooks do not run again for a resumed session.
        """
        self.resume_hooks = (*self.resume_hooks, _check_hook(hook, "on_resume"))
        return hook

    async def count_detached(self) -> int:
        """How many sessions are detached (waiting for their client): this worker's, or with a
        registry that keeps detached sessions for every worker (``RedisRegistry``) the whole
        cluster's. 0 without ``resume_window``.

        Raises:
            RegistryUnavailable: a cluster registry cannot reach its store.
        """
        if self.resumption is None:
            return 0
        return await self.resumption.count_detached()

    @property
    def detached(self) -> Mapping[str, Session]:
        """This worker's detached sessions by id (read-only; empty without
        ``resume_window``). They are registered too: :meth:`get`, :meth:`sessions` and
        :meth:`count` include them (their ``state`` is ``detached``)."""
        if self.resumption is None:
            return _NO_SESSIONS
        return self.resumption.detached

    # -- lifespan -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open the registry and, with ``drain_on_signal``, drain on SIGTERM/SIGINT (enter the
        manager from the app's lifespan: ``async with manager: yield``)."""
        await self.registry.__aenter__()
        if self.settings.drain_on_signal:
            self._install_signal_handlers()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drain what is still open, restore signal handlers, close the registry."""
        self._restore_signal_handlers()
        try:
            if self.local:
                await self.drain()
        finally:
            if self.resumption is not None:
                await self.resumption.end_all()
            await self.registry.__aexit__(exc_type, exc, tb)

    async def _ensure_started(self) -> None:
        """Enter the manager on the first connection if no lifespan entered it.

        Servers without a lifespan scope (daphne) never run ``async with manager``; the first
        WebSocket scope then opens the registry and installs the signal handlers, so a SIGTERM
        still drains. Nothing exits such a manager: its registry stays open until the process
        ends. Idempotent and safe under concurrency: connections arriving while the first one is
        entering wait for it, and the registry is entered once. If entering fails, the
        connection fails and the next one tries again. Under trio only the registry is entered
        (wsession's signal handlers need asyncio's loop).
        """
        if self._entered:
            return
        if self._start_lock is None:  # no await since the check: one lock per manager
            self._start_lock = anyio.Lock()
        async with self._start_lock:
            if self._entered:
                return
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # trio: the signal handlers need asyncio's loop; registry only
                await self.registry.__aenter__()
                self._entered = True
            else:
                await self.__aenter__()
            self.started_lazily = True

    # -- graceful drain ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` started: new connections are refused (503 / close 1001)."""
        return self.admission.draining

    async def drain(self, *, code: int | None = None, reason: str = "server shutting down") -> None:
        """Stop admitting, close this worker's sessions in batches, and wait for their
        disconnect hooks; returns within ``drain_timeout`` seconds.

        Sessions are closed with ``drain_code`` (1001 by default) and end as
        ``server shutdown``. Apps still running after 80 % of ``drain_timeout`` are cancelled
        (their disconnect hooks still run exactly once); the last 20 % is for those hooks. If
        any are still running at the deadline, a warning says how many: they finish in the
        background unless the process exits first. Safe to call more than once.
        """
        from ._delivery import close_session, force_end

        settings = self.settings
        code = settings.drain_code if code is None else _check_code(code)
        self.admission.draining = True
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + settings.drain_timeout
        cut_at = start + 0.8 * settings.drain_timeout
        pending = list(self.local.values())
        batches = max(1, -(-len(pending) // settings.drain_batch))
        for number, first in enumerate(range(0, len(pending), settings.drain_batch), 1):
            batch = pending[first : first + settings.drain_batch]
            # Each batch gets its share of the time: apps that never read cannot hold the
            # later batches back until the cut (they would get no time to say goodbye).
            batch_done_at = start + (cut_at - start) * number / batches
            for session in batch:
                close_session(
                    self,
                    session,
                    code,
                    reason,
                    grace=max(0.0, cut_at - loop.time()),
                    end_reason=EndReason.SERVER_SHUTDOWN,
                )
            await self._wait_local(partial(self._all_gone, [s.id for s in batch]), batch_done_at)
        # Cut whatever is still open (including sessions that were already closing on their
        # own), then give the shielded teardown the rest of the time to run their hooks.
        for session in list(self.local.values()):
            force_end(session)
        await self._wait_local(lambda: not self.local, deadline)
        if self.resumption is not None:
            # Nobody can resume them once this process is gone: they end here, hooks and all.
            with anyio.move_on_after(max(0.0, deadline - loop.time())):
                await self.resumption.end_all()
        if self.local:
            log_warning(
                None,
                "drain_timeout (%ss) reached with %d session(s) still ending; their disconnect "
                "hooks finish in the background unless the process exits first",
                settings.drain_timeout,
                len(self.local),
            )

    async def _wait_local(self, done: Callable[[], bool], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while not done() and loop.time() < deadline:
            if self._local_changed is None:
                self._local_changed = asyncio.Event()
            self._local_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await self._local_changed.wait()

    def _all_gone(self, ids: list[str]) -> bool:
        return not any(i in self.local for i in ids)

    def _forget_local(self, session: Session) -> None:
        if self.local.pop(session.id, None) is not None and self._local_changed is not None:
            self._local_changed.set()

    def _install_signal_handlers(self) -> None:
        # Servers (uvicorn) close every connection themselves on SIGTERM/SIGINT, with 1012:
        # run our drain first, then hand the signal to the handler that was there before.
        if threading.current_thread() is not threading.main_thread() or self._signal_handlers:
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            self._signal_handlers[sig] = previous

            def on_signal(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                if self.draining:  # a second signal: no more waiting
                    _call_previous(previous, signum, frame)
                    return
                loop.call_soon_threadsafe(self._start_drain, previous, signum, frame)

            signal.signal(sig, on_signal)

    def _start_drain(self, previous: Any, signum: int, frame: FrameType | None) -> None:
        # Keep a reference: the loop holds tasks only weakly.
        self._drain_task = asyncio.get_running_loop().create_task(
            self._drain_then(previous, signum, frame)
        )

    async def _drain_then(self, previous: Any, signum: int, frame: FrameType | None) -> None:
        try:
            await self.drain()
        finally:
            _call_previous(previous, signum, frame)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._signal_handlers.items():
            signal.signal(sig, previous)
        self._signal_handlers.clear()

    # -- queries --------------------------------------------------------------------------------

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None``."""
        return await self.registry.get(session_id)

    async def count(self) -> int:
        """How many sessions are live."""
        return await self.registry.count()

    async def sessions(self, where: SessionFilter | None = None) -> list[Session]:
        """Live sessions, optionally filtered by ``where(session) -> bool``."""
        return await self.registry.sessions(where)

    # -- reaching sessions (from any code: HTTP endpoints, tasks, other connections) --------

    async def send(self, session_id: str, data: Any) -> SendResult:
        """Send ``data`` to one session: ``str`` as text, ``bytes`` as binary, anything else
        (dicts, lists, pydantic models) as JSON text.

        Returns a :class:`~wsession.SendResult` (``delivered``, ``queued``, ``dropped``,
        ``gone``); never raises because the connection closed.
        """
        return await self.registry.send(session_id, to_message(data))

    async def send_group(self, group: str, data: Any, *, exclude: str | None = None) -> int:
        """Send ``data`` to every member of ``group`` except ``exclude``; returns how many."""
        return await self.registry.send_group(group, to_message(data), exclude)

    async def send_user(self, user_key: str, data: Any) -> int:
        """Send ``data`` to every session whose ``user_key`` matches; returns how many."""
        return await self.registry.send_user(user_key, to_message(data))

    async def broadcast(self, data: Any, *, exclude: str | None = None) -> int:
        """Send ``data`` to every open session except ``exclude``; returns how many."""
        return await self.registry.broadcast(to_message(data), exclude)

    async def join(self, session_id: str, group: str) -> bool:
        """Add a session to ``group``; it leaves automatically when it ends.

        Returns False for an unknown or closed session.

        Raises:
            ValueError: ``group`` is not a non-empty string.
            LimitExceeded: ``group`` is longer than ``max_group_name_length``, or the session
                (one of this worker's) is in ``max_groups_per_session`` groups already.
        """
        settings = self.settings
        group = _check_name(group, "group")
        if len(group) > settings.max_group_name_length:
            raise LimitExceeded(
                f"group name of {len(group)} characters exceeds max_group_name_length "
                f"({settings.max_group_name_length})"
            )
        session = self.local.get(session_id)
        if (
            session is not None
            and len(session.groups) >= settings.max_groups_per_session
            and group not in session.groups
        ):
            raise LimitExceeded(
                f"session {session_id} is in {len(session.groups)} groups: "
                f"max_groups_per_session ({settings.max_groups_per_session}) reached"
            )
        # Registries add a local session to the group before their first await, so two
        # concurrent joins cannot both pass the check above.
        return await self.registry.join(session_id, group)

    async def leave(self, session_id: str, group: str) -> bool:
        """Remove a session from ``group``; False if it was not a member."""
        return await self.registry.leave(session_id, group)

    async def members(self, group: str) -> list[str]:
        """Ids of the live members of ``group``."""
        return await self.registry.members(group)

    async def user_sessions(self, user_key: str) -> list[str]:
        """Ids of the live sessions of one user."""
        return await self.registry.user_sessions(user_key)

    async def close(self, session_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close (kick) one session with ``code`` and ``reason``.

        Its disconnect hooks run exactly once, with ``end_reason`` ``server closed``. An app that
        does not end within ``close_timeout`` seconds is cancelled. False if unknown or ending.
        """
        return await self.registry.close(session_id, _check_code(code), reason)

    async def close_user(self, user_key: str, code: int = 1000, reason: str = "") -> int:
        """Close every session of one user; returns how many were closed."""
        return await self.registry.close_user(user_key, _check_code(code), reason)

    # -- presence ---------------------------------------------------------------------------

    @property
    def presence(self) -> Presence:
        """Who is online, per topic and per user, with batched diffs to subscribers (see
        :class:`~wsession.Presence`). Created on first use: apps that never touch it pay
        nothing per connection."""
        if self._presence is None:
            self._presence = Presence(self)
        return self._presence

    @property
    def presence_if_used(self) -> Presence | None:
        """:attr:`presence` if anything made it yet, else ``None`` (for registries, which must
        not create it for apps that never use presence)."""
        return self._presence

    def _end_presence(self, session: Session) -> None:
        """Called once by a session's teardown: it leaves every presence topic."""
        if self._presence is not None:
            self._presence.session_ended(session)

    # -- credentials on long-lived connections --------------------------------------------

    async def refresh(self, session: Session | str, credential: Any = None) -> datetime | None:
        """Validate a new credential for a live session of this worker and move its
        ``expires_at`` (in-band refresh: call it when the client sends a new token).

        The refresh hooks run in order, together bounded by ``connect_timeout``; the session's
        new ``expires_at`` is the earliest expiry they return, and its expiry timer is re-armed
        for it. If a hook returns ``None``, raises :class:`~wsession.Refuse` (its reason is sent)
        or anything else (logged, counted in ``hook_errors``), if the expiry is not in the
        future, or if no refresh hook is registered, the refresh fails: the session is closed
        with ``expiry_code`` and ends as ``server closed``. Counted in ``stats.refreshes``.

        Args:
            session: the session, or its id (it must be this worker's: the refresh runs where
                the connection is).
            credential: whatever the hooks need (a token); passed to them unchanged.

        Returns:
            The new ``expires_at`` (UTC), or ``None`` when the refresh failed (the session is
            being closed) or the session is not open here (unknown id, another worker's,
            already ending). Concurrent refreshes of one session: the last to finish wins.
        """
        from ._expiry import refresh

        return await refresh(self, session, credential)

    async def revoke_user(self, user_key: str, code: int = 4403, reason: str = "revoked") -> int:
        """Close every session of ``user_key`` on every worker (disconnect hooks once each,
        ``end_reason`` ``server closed``), and with ``revocation_ttl`` put the user key on the
        denylist that :meth:`is_revoked` reads, for that many seconds.

        The denylist entry is written before the sessions are closed, so a reconnect racing the
        revocation is refused by a connect hook that checks it. Returns how many sessions were
        closed (another worker's counted once its worker was told). Counted in
        ``stats.revocations`` and ``stats.revoked``.

        Raises:
            RegistryUnavailable: a cluster registry cannot reach its store: this worker's
                sessions were closed, the others (and the denylist entry) may not be.
        """
        _check_name(user_key, "user_key")
        _check_code(code)
        self.stats.revocations["user"] += 1
        failure = await self._deny(f"user:{user_key}")
        closed = await self.registry.close_user(user_key, code, reason)
        self.stats.revoked += closed
        if failure is not None:
            raise failure
        return closed

    async def revoke_session(
        self, session_id: str, code: int = 4403, reason: str = "revoked"
    ) -> bool:
        """Close one session wherever it lives (its disconnect hooks run once), and with
        ``revocation_ttl`` put its id on the denylist (see :meth:`revoke_user`). Returns False
        if no live session has this id (it is denylisted all the same).

        Raises:
            RegistryUnavailable: as for :meth:`revoke_user`.
        """
        _check_name(session_id, "session_id")
        _check_code(code)
        self.stats.revocations["session"] += 1
        failure = await self._deny(f"session:{session_id}")
        closed = await self.registry.close(session_id, code, reason)
        self.stats.revoked += closed
        if failure is not None:
            raise failure
        return closed

    async def is_revoked(
        self, *, user_key: str | None = None, session_id: str | None = None
    ) -> bool:
        """Whether ``user_key`` or ``session_id`` was revoked within the last
        ``revocation_ttl`` seconds (on any worker, with a cluster registry): for connect hooks,
        to refuse a revoked credential (``raise Refuse(403)``). Always False when
        ``revocation_ttl`` is None (nothing is recorded then).

        Raises:
            ValueError: neither ``user_key`` nor ``session_id`` was given.
            RegistryUnavailable: a cluster registry cannot reach its store (a connect hook that
                lets it propagate refuses the connection: fail closed).
        """
        if user_key is None and session_id is None:
            raise ValueError("is_revoked: give user_key, session_id or both")
        if self.settings.revocation_ttl is None:
            return False
        keys = []
        if user_key is not None:
            keys.append(f"user:{user_key}")
        if session_id is not None:
            keys.append(f"session:{session_id}")
        for key in keys:
            if await self.registry.is_denied(key):
                return True
        return False

    async def _deny(self, key: str) -> RegistryUnavailable | None:
        ttl = self.settings.revocation_ttl
        if ttl is None:
            return None
        try:
            await self.registry.deny(key, ttl)
        except RegistryUnavailable as exc:
            return exc  # close what can be closed first, then report it
        return None

    # -- used by the middleware -----------------------------------------------------------

    def new_data(self) -> Any:
        """Fresh ``session.data``: a default instance of ``data_model``, else an empty dict."""
        return self.data_model() if self.data_model is not None else {}


C = TypeVar("C")
_NO_SESSIONS: Mapping[str, Session] = MappingProxyType({})


def _check_hook(hook: C, name: str) -> C:
    if not callable(hook):
        raise ConfigurationError(f"{name}: a hook must be callable, got {hook!r}")
    return hook


def _check_data_model(model: Any) -> type[BaseModel] | None:
    if model is None:
        return None
    if not (inspect.isclass(model) and issubclass(model, BaseModel)):
        raise ConfigurationError(
            f"data_model: expected a pydantic BaseModel subclass, got {model!r}"
        )
    try:
        model()
    except ValidationError as exc:
        missing = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        raise ConfigurationError(
            f"data_model: {model.__name__} must be constructible without arguments (give "
            f"defaults to: {missing}); connect hooks fill the fields in"
        ) from None
    return model


def _call_previous(previous: Any, signum: int, frame: FrameType | None) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        # The default action would kill the process on the spot: no lifespan shutdown, no
        # atexit, no finally blocks. Exit the way Python exits instead, with the status a
        # shell reports for that signal. Raised in the drain task, it stops the event loop,
        # whose runner then cancels and unwinds the remaining tasks.
        raise SystemExit(128 + signum)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    return name


def _check_code(code: int) -> int:
    Refuse(code=code)  # the same validation as refusals: a sendable close code
    return code
