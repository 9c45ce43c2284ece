"""Smoke test of the built wheel: catch a file missing from the package before users do.

``make wheel-smoke`` runs it (and CI through ``.ci/run``)::

    python scripts/wheel_smoke.py --python python3 dist/wsession-X-py3-none-any.whl

1. A fresh venv gets the wheel (not editable) with the ``example`` and ``redis`` extras.
2. Every file of the source package (``wsession/**/*.py``, ``py.typed`` and the JavaScript
   client ``wsession/static/*.js``) must be in the installed distribution, every public module
   must import from that venv's site-packages, never from this checkout, and
   ``wsession.client_script_path()`` must name the installed copy of the script.
3. A copy of ``example_app/`` (it is not part of the wheel), alone in a scratch directory, is
   served by that venv's ``python -m example_app``; one WebSocket round trip (welcome, echo,
   a server-sent ``dm`` through ``POST /api/send``), ``/api/sessions``, ``/api/stats``,
   ``/metrics`` and the bearer-protected ``/admin/stats`` must answer as the example's
   contract says. Then SIGTERM must end the server within its drain bound.

The client side runs here, in the development venv (``websockets`` and the standard library).
Exits non-zero with a message on the first failed check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = (
    "wsession",
    "wsession.backends",
    "wsession.backends.memory",
    "wsession.backends.redis",
    "wsession.metrics",
    "wsession.admin",
)
# Package files by suffix: the modules, and the JavaScript client (wsession/static/).
PACKAGE_SUFFIXES = (".py", ".js")
CLIENT_SCRIPT = ROOT / "wsession" / "static" / "wsession-client.js"
ADMIN_TOKEN = "wheel-smoke-token"
STEP_TIMEOUT = 10.0


class SmokeFailure(Exception):
    """A check of the installed wheel failed; the message says which."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`SmokeFailure` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SmokeFailure(message)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run ``cmd`` to completion (at most 5 minutes) and return its stdout."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=cwd)
    if done.returncode != 0:
        raise SmokeFailure(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def make_venv(python: str, where: Path, wheel: Path) -> Path:
    """Create a venv at ``where`` with ``wheel[example,redis]`` installed; return its python."""
    run([python, "-m", "venv", str(where)])
    venv_python = where / "bin" / "python"
    run([str(venv_python), "-m", "pip", "install", "-q", f"{wheel}[example,redis]"])
    return venv_python


def check_installed_files(venv_python: Path, scratch: Path) -> None:
    """Every package file of the checkout is installed, and imports come from the venv."""
    expected = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "wsession").rglob("*")
        if path.is_file() and (path.suffix in PACKAGE_SUFFIXES or path.name == "py.typed")
    )
    probe = (
        "import hashlib, importlib, importlib.metadata, json, wsession\n"
        f"mods = {{m: importlib.import_module(m).__file__ for m in {PUBLIC_MODULES!r}}}\n"
        # Files on disk, not only RECORD entries (a RECORD can list what is not there).
        "files = [f.as_posix() for f in importlib.metadata.files('wsession') or ()"
        " if f.locate().is_file()]\n"
        # The path the client_script_route() serves from must be the installed file.
        "js = wsession.client_script_path()\n"
        "script = {'path': str(js), 'sha256': js.is_file()"
        " and hashlib.sha256(js.read_bytes()).hexdigest()}\n"
        "print(json.dumps({'modules': mods, 'files': files, 'script': script}))\n"
    )
    # cwd is a scratch directory, so the checkout's wsession/ cannot shadow the installed one.
    report = json.loads(run([str(venv_python), "-c", probe], cwd=scratch))
    missing = sorted(set(expected) - set(report["files"]))
    check(not missing, f"files missing from the wheel: {missing}")
    venv_root = venv_python.parent.parent.resolve()
    for module, path in report["modules"].items():
        check(
            Path(path).resolve().is_relative_to(venv_root),
            f"{module} imported from {path}, not from the fresh venv",
        )
    script = report["script"]
    check(
        Path(script["path"]).resolve().is_relative_to(venv_root)
        and script["sha256"] == hashlib.sha256(CLIENT_SCRIPT.read_bytes()).hexdigest(),
        f"the installed JavaScript client is missing or differs: {script}",
    )
    print(f"wheel-smoke: {len(expected)} package files installed, {len(PUBLIC_MODULES)} modules")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str]) -> None:
    """Return once ``port`` accepts connections; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # bounded by the deadline
        check(proc.poll() is None, f"the example app exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SmokeFailure(f"the example app did not listen on port {port} within 20 s")


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
    """One HTTP request; return (status, body) for any status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=STEP_TIMEOUT) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


def next_message(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a presence diff (those come on the example's own clock)."""
    for _ in range(20):  # each recv waits at most STEP_TIMEOUT; one connection sees few diffs
        message: dict[str, Any] = json.loads(ws.recv(timeout=STEP_TIMEOUT))
        if message.get("type") != "presence_diff":
            return message
    raise SmokeFailure("only presence diffs arrived (20 of them)")


def exercise_example(port: int) -> None:
    """The example's contract, one check per surface."""
    base = f"http://127.0.0.1:{port}"
    status, page = http("GET", f"{base}/")
    check(status == 200 and b"<html" in page.lower(), f"GET / answered {status}")
    with connect(f"ws://127.0.0.1:{port}/ws?name=smoke", open_timeout=STEP_TIMEOUT) as ws:
        welcome = json.loads(ws.recv(timeout=STEP_TIMEOUT))
        check(welcome.get("type") == "welcome", f"first message is not a welcome: {welcome}")
        session_id = welcome["id"]
        # Resumption is on by default in the example: every message but the welcome is numbered.
        check(isinstance(welcome.get("resume"), str), f"the welcome has no resume token: {welcome}")
        ws.send(json.dumps({"type": "echo", "text": "ping"}))
        echo = next_message(ws)
        echo_seq = echo.pop("seq", None)
        check(echo == {"type": "echo", "text": "ping"}, f"echo answered {echo}")
        check(isinstance(echo_seq, int) and echo_seq >= 1, f"echo numbered {echo_seq!r}")

        status, raw = http("GET", f"{base}/api/sessions")
        ids = [entry["id"] for entry in json.loads(raw)["sessions"]] if status == 200 else []
        check(session_id in ids, f"/api/sessions answered {status} without the session: {raw!r}")
        status, raw = http("GET", f"{base}/api/stats")
        check(status == 200 and json.loads(raw)["live"] == 1, f"/api/stats: {status} {raw!r}")

        status, raw = http("POST", f"{base}/api/send/{session_id}", {"text": "from http"})
        check(status == 200, f"POST /api/send answered {status}: {raw!r}")
        dm = next_message(ws)
        dm_seq = dm.pop("seq", None)
        check(dm == {"type": "dm", "from": "server", "text": "from http"}, f"dm arrived as {dm}")
        check(isinstance(dm_seq, int) and dm_seq > echo_seq, f"dm numbered {dm_seq!r}")

        status, raw = http("GET", f"{base}/metrics")
        check(status == 200 and b"wsession_sessions_live 1.0" in raw, f"/metrics: {status}")
        status, _ = http("GET", f"{base}/admin/stats")
        check(status == 401, f"/admin/stats without a token answered {status}")
        status, raw = http("GET", f"{base}/admin/stats", token=ADMIN_TOKEN)
        check(status == 200 and json.loads(raw)["local_live"] == 1, f"/admin/stats: {status}")
    print("wheel-smoke: WebSocket round trip, /api, /metrics and /admin answered")


def serve_example(venv_python: Path, scratch: Path) -> None:
    """Run a copy of the example app from the fresh venv, exercise it, stop it with SIGTERM."""
    app_dir = scratch / "app"
    shutil.copytree(
        ROOT / "example_app", app_dir / "example_app", ignore=shutil.ignore_patterns("__pycache__")
    )
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WSESSION_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        PORT=str(port),
        WSESSION_ADMIN_TOKEN=ADMIN_TOKEN,
        WSESSION_DRAIN_TIMEOUT="2",
        WSESSION_LOG_LEVEL="info",
    )
    log_path = scratch / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(venv_python), "-m", "example_app"],
            cwd=app_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for_port(port, proc)
            exercise_example(port)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
            # uvicorn re-raises a handled SIGTERM once it has shut down, so the exit status
            # says "terminated" even after a clean shutdown; the log line shows it was clean.
            check(
                code in (0, -signal.SIGTERM, 128 + signal.SIGTERM),
                f"the example app exited with {code} after SIGTERM",
            )
            log.flush()
            check(
                "Application shutdown complete" in log_path.read_text(),
                "the example app's lifespan shutdown did not complete after SIGTERM",
            )
        except BaseException:
            print(log_path.read_text(), file=sys.stderr)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def main() -> int:
    """Parse arguments, run every check, report the time taken."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("wheel", type=Path, help="the wheel built by `make dist`")
    parser.add_argument("--python", default="python3", help="interpreter for the fresh venv")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wsession-wheel-smoke-") as tmp:
        scratch = Path(tmp)
        try:
            venv_python = make_venv(args.python, scratch / "venv", args.wheel.resolve())
            check_installed_files(venv_python, scratch)
            serve_example(venv_python, scratch)
        except SmokeFailure as failure:
            print(f"wheel-smoke: FAILED: {failure}", file=sys.stderr)
            return 1
    print(f"wheel-smoke: passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
