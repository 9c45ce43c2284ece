"""Run Starlette's and uvicorn's own WebSocket tests as published and through wsession; compare.

Usage (``make conformance`` does this)::

    python conformance/run.py --cache .cache/conformance [--suite NAME ...] [--selftest quick]
    python conformance/run.py --cache .cache/conformance --selftest full   # every break, all files

The suites come from the sdists unpacked in ``<cache>/src``; pytest runs from the sdist's folder
(its own pytest configuration applies) with the interpreter running this script. For each suite:

1. baseline: the files as published, ``--junitxml`` per-test outcomes;
2. wrapped, twice: the same files with ``-p wsession_wrap`` (every app wrapped by wsession), once
   with plain-function hooks (wsession's fast teardown path) and once with async hooks (its
   shielded teardown path);
3. each wrapped pass must match the baseline test by test (passed, failed, skipped, xfailed,
   ...), except for the differences listed and explained in ``_UVICORN_WSPROTO_DENIAL_SHUTDOWN``,
   which must then all show up; and the plugin's summary must report no problem (scopes
   wrapped, none bypassed, contract held).

A difference found in a parallel (xdist) run is re-run serially in both modes before it counts:
uvicorn's suite has tests that allow 100 ms for a handshake, which a 2-core machine running
several workers does not always give. A difference that the serial re-run does not reproduce is
reported as a timing flake and does not fail the run (``CONFORMANCE_STRICT=1`` makes it fail).

Then the server matrix (tests/test_server_matrix.py) runs with the project's own venv (it needs
hypercorn, daphne and granian, which this venv does not have), and one summary line per server
says how its checks went: passed, known deviations asserted (tests named after the server), and
runs the server itself crashed (xfailed). Any failure fails the run.

The self-test proves the checks can fail: with ``WSESSION_CONFORMANCE_BREAK`` set, the
comparison (or the plugin's own check) must report the breakage.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from wsession_wrap import SUMMARY_FILE, describe  # noqa: E402

Outcomes = dict[str, str]

# Worse outcomes win when a test case carries several (a call failure and a teardown error).
_RANK = {"passed": 0, "skipped": 1, "xfailed": 2, "failed": 3, "error": 4}
_TIMEOUT = 30  # seconds per test (pytest-timeout)
_RUN_LIMIT = 900  # seconds for one pytest process, whatever happens


# uvicorn 0.54.0 bug, reproduced without wsession (an app that awaits anything between
# ``websocket.http.response.start`` and returning): ``WSProtocol.shutdown()`` (wsproto) sends a
# close frame while wsproto is still REJECTING and raises ``LocalProtocolError`` out of
# ``Server.shutdown()``. With async disconnect hooks, wsession awaits them before it returns to
# the server, which opens that window in these tests; the test's shutdown then fails.
_UVICORN_WSPROTO_DENIAL_SHUTDOWN = {
    f"tests.protocols.test_websocket::{test}[wsproto-{http}]": "passed -> failed"
    for test in (
        "test_server_multiple_websocket_http_response_start_events",
        "test_server_reject_connection_with_invalid_msg",
        "test_server_reject_connection_with_missing_body",
    )
    for http in ("httptools", "h11", "zttp")
}


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    workers: int  # pytest-xdist workers; 0 runs serially
    files: tuple[str, ...]
    quick: tuple[str, ...]  # files for the quick self-test
    # Wrapped passes: WSESSION_CONFORMANCE_HOOKS -> the differences known and explained for it
    # (``test id -> "baseline -> wrapped"``); a pass must show exactly those.
    passes: dict[str, dict[str, str]]

    def root(self, cache: Path) -> Path:
        return cache / "src" / f"{self.name}-{self.version}"


def _suites(cache: Path, versions: dict[str, str]) -> dict[str, Suite]:
    for name, version in versions.items():
        installed = importlib.metadata.version(name)
        if installed != version:
            raise SystemExit(
                f"{name}: the conformance venv has {installed}, the sdist is {version}: "
                "make conformance/requirements.txt and the Makefile agree"
            )
        if not (cache / "src" / f"{name}-{version}" / "tests").is_dir():
            raise SystemExit(f"{name} {version}: no unpacked sdist under {cache / 'src'}")
    workers = int(os.environ.get("CONFORMANCE_WORKERS", "4"))
    starlette_root = cache / "src" / f"starlette-{versions['starlette']}"
    starlette_files = tuple(
        sorted(
            str(p.relative_to(starlette_root))
            for p in (starlette_root / "tests").rglob("test_*.py")
            if "websocket_connect" in p.read_text()
        )
    )
    return {
        # Every Starlette test runs over asyncio and trio, so the async pass exercises
        # wsession's shielded teardown on both.
        "starlette": Suite(
            "starlette",
            versions["starlette"],
            0,
            starlette_files,
            ("tests/test_websockets.py",),
            {"sync": {}, "async": {}},
        ),
        "uvicorn": Suite(
            "uvicorn",
            versions["uvicorn"],
            workers,
            (
                "tests/protocols/test_websocket.py",
                "tests/protocols/test_http.py",
                "tests/middleware/test_proxy_headers.py",
            ),
            ("tests/protocols/test_websocket.py",),
            {"sync": {}, "async": _UVICORN_WSPROTO_DENIAL_SHUTDOWN},
        ),
    }


# -- running pytest -------------------------------------------------------------------------


@dataclass
class Run:
    outcomes: Outcomes
    seconds: float
    returncode: int
    log: Path
    summary: dict[str, object] | None = None


def run_pytest(
    suite: Suite,
    cache: Path,
    label: str,
    files: tuple[str, ...] | list[str],
    *,
    wrapped: bool,
    workers: int,
    hooks: str = "sync",
    env_extra: dict[str, str] | None = None,
) -> Run:
    out = cache / "out"
    out.mkdir(parents=True, exist_ok=True)
    junit = out / f"{suite.name}-{label}.xml"
    log = out / f"{suite.name}-{label}.log"
    plugin_out = out / f"{suite.name}-{label}.wrap"
    for stale in (junit, log):
        stale.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--timeout={_TIMEOUT}",
        f"--junitxml={junit.resolve()}",
        "-o",
        "junit_family=xunit1",
        "-n",
        str(workers),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSESSION_CONFORMANCE_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if wrapped:
        cmd += ["-p", "wsession_wrap"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["WSESSION_CONFORMANCE_OUT"] = str(plugin_out.resolve())
        env["WSESSION_CONFORMANCE_HOOKS"] = hooks
    env.update(env_extra or {})
    cmd += list(files)
    started = time.monotonic()
    with log.open("w") as sink:
        # Own process group, so that a run past the limit is stopped with its xdist workers.
        proc = subprocess.Popen(
            cmd,
            cwd=suite.root(cache),
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=_RUN_LIMIT)
        except BaseException as exc:  # the limit, or Ctrl-C: never leave the run behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise SystemExit(
                    f"{suite.name} {label}: still running after {_RUN_LIMIT} s"
                ) from None
            raise
    seconds = time.monotonic() - started
    if proc.returncode not in (0, 1) or not junit.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(
            f"{suite.name} {label}: pytest exited {proc.returncode} (see {log}):\n{tail}"
        )
    summary = None
    if wrapped:
        path = plugin_out / SUMMARY_FILE
        summary = json.loads(path.read_text()) if path.exists() else None
    return Run(parse_junit(junit), seconds, proc.returncode, log, summary)


def parse_junit(path: Path) -> Outcomes:
    """Per-test outcome (``passed``/``failed``/``error``/``skipped``/``xfailed``) by test id."""
    outcomes: Outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag == "error":
                kind = "error"
            elif child.tag == "failure":
                kind = "failed"
            elif child.tag == "skipped":
                kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            else:
                continue
            if _RANK[kind] > _RANK[outcome]:
                outcome = kind
        if test_id in outcomes and _RANK[outcomes[test_id]] > _RANK[outcome]:
            outcome = outcomes[test_id]
        outcomes[test_id] = outcome
    return outcomes


def counts(outcomes: Outcomes) -> str:
    c = Counter(outcomes.values())
    order = ["passed", "failed", "error", "skipped", "xfailed"]
    return ", ".join(f"{c[k]} {k}" for k in order if c[k]) or "no tests"


def differences(baseline: Outcomes, wrapped: Outcomes, *, only_wrapped: bool = False) -> Outcomes:
    """``test id -> "baseline -> wrapped"`` for every test whose outcome differs.

    With ``only_wrapped``, tests the wrapped run did not run are ignored (a subset run).
    """
    ids = set(wrapped) if only_wrapped else set(baseline) | set(wrapped)
    return {
        t: f"{baseline.get(t, 'absent')} -> {wrapped.get(t, 'absent')}"
        for t in sorted(ids)
        if baseline.get(t) != wrapped.get(t)
    }


def _node_ids(root: Path, test_ids: list[str]) -> list[str]:
    """junit ids (``tests.protocols.test_x::test_y[p]``) back to pytest node ids under ``root``."""
    nodes = []
    for test_id in test_ids:
        classname, name = test_id.split("::", 1)
        parts = classname.split(".")
        # classname is the module path, possibly followed by a class name.
        for cut in range(len(parts), 0, -1):
            module = Path(*parts[:cut]).with_suffix(".py")
            if (root / module).exists():
                nodes.append("::".join([str(module), *parts[cut:], name]))
                break
    return nodes


# -- a suite end to end ----------------------------------------------------------------------


@dataclass
class Verdict:
    ok: bool
    lines: list[str] = field(default_factory=list)


def check_suite(suite: Suite, cache: Path) -> Verdict:
    lines = [f"== {suite.name} {suite.version}: {len(suite.files)} test files =="]
    lines += [f"   {f}" for f in suite.files]
    baseline = run_pytest(
        suite, cache, "baseline", suite.files, wrapped=False, workers=suite.workers
    )
    lines.append(f"baseline: {counts(baseline.outcomes)}  ({baseline.seconds:.1f} s)")
    ok = bool(baseline.outcomes)
    for hooks, known in suite.passes.items():
        pass_ok, pass_lines = _check_pass(suite, cache, baseline.outcomes, hooks, known)
        ok = ok and pass_ok
        lines += pass_lines
    lines.append(f"{suite.name}: {'OK' if ok else 'FAILED'}  (logs: {cache / 'out'})")
    return Verdict(ok, lines)


def _check_pass(
    suite: Suite, cache: Path, baseline: Outcomes, hooks: str, known: dict[str, str]
) -> tuple[bool, list[str]]:
    label = f"wrapped-{hooks}"
    wrapped = run_pytest(
        suite, cache, label, suite.files, wrapped=True, workers=suite.workers, hooks=hooks
    )
    lines = [f"wrapped, {hooks} hooks: {counts(wrapped.outcomes)}  ({wrapped.seconds:.1f} s)"]
    ok = True
    if wrapped.summary is None:
        lines.append("   the wrapped run wrote no plugin summary: FAILED")
        ok = False
    else:
        lines += ["   " + line.replace("wsession-wrap: ", "") for line in describe(wrapped.summary)]
        ok = not wrapped.summary["problems"]
    diff = differences(baseline, wrapped.outcomes)
    unexpected = {t: c for t, c in diff.items() if known.get(t) != c}
    if unexpected and suite.workers and os.environ.get("CONFORMANCE_STRICT") != "1":
        lines.append(f"   {len(unexpected)} difference(s) in the parallel runs: re-run serially")
        confirmed, flakes = _confirm_serially(suite, cache, baseline, unexpected, hooks)
        for test_id, change in flakes.items():
            lines.append(f"   WARNING timing flake, not reproduced serially: {test_id}: {change}")
        diff = {t: c for t, c in diff.items() if t not in flakes}
        unexpected = confirmed
    explained = {t: c for t, c in diff.items() if t not in unexpected}
    vanished = sorted(set(known) - set(explained))
    if explained:
        lines.append(
            f"   {len(explained)} known difference(s), explained in conformance/run.py "
            "(a uvicorn bug, not wsession's):"
        )
        lines += [f"      {t}: {c}" for t, c in explained.items()]
    if vanished:
        ok = False
        lines.append(f"   {len(vanished)} known difference(s) no longer seen: update run.py")
        lines += [f"      {t}" for t in vanished]
    if unexpected:
        ok = False
        lines.append(f"   comparison: {len(unexpected)} test(s) differ: FAILED")
        lines += [f"      {t}: {change}" for t, change in unexpected.items()]
    else:
        same = len(baseline) - len(explained)
        lines.append(f"   comparison: identical outcomes for {same} of {len(baseline)} tests")
    return ok, lines


def _confirm_serially(
    suite: Suite, cache: Path, baseline: Outcomes, diff: Outcomes, hooks: str
) -> tuple[Outcomes, Outcomes]:
    """Split ``diff`` into (confirmed, flakes) by re-running those tests serially, both ways."""
    nodes = _node_ids(suite.root(cache), list(diff))
    again_base = run_pytest(suite, cache, "recheck-baseline", nodes, wrapped=False, workers=0)
    again_wrap = run_pytest(
        suite, cache, f"recheck-{hooks}", nodes, wrapped=True, workers=0, hooks=hooks
    )
    confirmed: Outcomes = {}
    flakes: Outcomes = {}
    for test_id, change in diff.items():
        serial_base = again_base.outcomes.get(test_id)
        serial_wrap = again_wrap.outcomes.get(test_id)
        if serial_wrap is not None and serial_wrap == serial_base == baseline.get(test_id):
            flakes[test_id] = change
        else:
            confirmed[test_id] = f"{change} (serially: {serial_base} -> {serial_wrap})"
    return confirmed, flakes


# -- self-test: the checks must be able to fail -----------------------------------------------


def selftest(suites: dict[str, Suite], cache: Path, mode: str) -> Verdict:
    lines = [f"== self-test ({mode}): deliberately broken wrappers must be caught =="]
    ok = True
    if mode == "quick":
        suite = suites["starlette"]
        baseline = parse_junit(cache / "out" / f"{suite.name}-baseline.xml")
        for brk, expect in (
            ("drop-reason", "comparison"),
            ("lose-disconnect", "contract"),
            ("bypass", "bypass"),
        ):
            caught, line = _one_break(suite, cache, baseline, brk, suite.quick, expect)
            ok = ok and caught
            lines.append(line)
    else:
        for brk in (
            "drop-reason",
            "drop-subprotocol",
            "drop-denial",
            "rewrite-codes",
            "drop-return",
        ):
            per_suite = []
            caught_any = False
            for suite in suites.values():
                baseline_xml = cache / "out" / f"{suite.name}-baseline.xml"
                if not baseline_xml.exists():
                    run_pytest(
                        suite, cache, "baseline", suite.files, wrapped=False, workers=suite.workers
                    )
                baseline = parse_junit(baseline_xml)
                # Each break must be seen by at least one of the suites, not by each.
                caught, line = _one_break(
                    suite, cache, baseline, brk, suite.files, "comparison", required=False
                )
                caught_any = caught_any or caught
                per_suite.append(line)
            ok = ok and caught_any
            lines += per_suite
            lines.append(f"{brk}: {'caught' if caught_any else 'NOT CAUGHT'}")
    lines.append(f"self-test: {'OK' if ok else 'FAILED'}")
    return Verdict(ok, lines)


def _one_break(
    suite: Suite,
    cache: Path,
    baseline: Outcomes,
    brk: str,
    files: tuple[str, ...],
    expect: str,
    *,
    required: bool = True,
) -> tuple[bool, str]:
    run = run_pytest(
        suite,
        cache,
        f"break-{brk}",
        files,
        wrapped=True,
        workers=suite.workers,
        env_extra={"WSESSION_CONFORMANCE_BREAK": brk},
    )
    diff = differences(baseline, run.outcomes, only_wrapped=True)
    problems = [str(p) for p in (run.summary or {}).get("problems", [])]  # type: ignore[attr-defined]
    if expect == "comparison":
        caught = bool(diff)
        found = f"{len(diff)} of {len(run.outcomes)} tests differ from the baseline"
    elif expect == "contract":
        caught = any("disconnect hooks never ran" in p for p in problems)
        found = "; ".join(problems) or "no problem reported"
    else:
        caught = any("bypassed" in p for p in problems)
        found = "; ".join(problems) or "no problem reported"
    verdict = "caught" if caught else "NOT CAUGHT"
    if not caught and not required:
        verdict = "not visible in this suite"
    return caught, f"{suite.name} BREAK={brk}: {found} ({run.seconds:.1f} s): {verdict}"


# -- the server matrix ------------------------------------------------------------------------

_SERVERS = ("uvicorn", "hypercorn", "daphne", "granian")
_REPO = HERE.parent


def server_matrix(cache: Path, python: Path) -> Verdict:
    """Run tests/test_server_matrix.py with ``python``; one summary line per server."""
    if not python.exists():
        return Verdict(False, [f"server matrix: no {python} (run `make install` first): FAILED"])
    out = cache / "out"
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "server-matrix.xml"
    log = out / "server-matrix.log"
    junit.unlink(missing_ok=True)
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    cmd += ["-o", "junit_family=xunit1", "tests/test_server_matrix.py"]
    started = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=_REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=_RUN_LIMIT)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    seconds = time.monotonic() - started
    if not junit.exists():
        return Verdict(False, [f"server matrix: pytest exited {proc.returncode} (see {log})"])
    outcomes = parse_junit(junit)
    lines = [f"== server matrix: {counts(outcomes)}  ({seconds:.1f} s, log: {log}) =="]
    lines += [server_line(server, outcomes) for server in _SERVERS]
    ok = proc.returncode == 0 and not any(o in ("failed", "error") for o in outcomes.values())
    lines.append(f"server matrix: {'OK' if ok else 'FAILED'}")
    return Verdict(ok, lines)


def server_line(server: str, outcomes: Outcomes) -> str:
    """``hypercorn: 20 of 20 checks passed, 2 known deviation(s) asserted`` for one server.

    A test belongs to the server it is parametrised with (``[hypercorn]``, ``[granian-3]``), or
    else to the servers its name mentions. A test whose name mentions the server asserts one of
    its known deviations (``test_hypercorn_reports_...``); the others are the shared checks.
    """
    checks: Counter[str] = Counter()
    deviations: Counter[str] = Counter()
    for test_id, outcome in outcomes.items():
        function, _, params = test_id.split("::")[-1].partition("[")
        named = set(function.split("_")) & set(_SERVERS)
        given = set(params.rstrip("]").split("-")) & set(_SERVERS)
        if server not in (given or named):
            continue
        (deviations if server in named else checks)[outcome] += 1
    parts = [f"{checks['passed']} of {sum(checks.values())} checks passed"]
    if checks["failed"] + checks["error"]:
        parts.append(f"{checks['failed'] + checks['error']} FAILED")
    if checks["xfailed"]:
        parts.append(
            f"{checks['xfailed']} SIGTERM run(s) broken by the server (xfailed: a crash or "
            "lost close frames, the reason is in the log)"
        )
    parts.append(f"{deviations['passed']} known deviation(s) asserted")
    if deviations["xfailed"]:
        parts.append(f"{deviations['xfailed']} known wsession defect(s) (strict xfail)")
    if deviations["failed"] + deviations["error"]:
        parts.append(f"{deviations['failed'] + deviations['error']} deviation test(s) FAILED")
    return f"{server}: " + ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/conformance"))
    parser.add_argument("--starlette", default="1.10.0", help="version of the unpacked sdist")
    parser.add_argument("--uvicorn", default="0.54.0", help="version of the unpacked sdist")
    parser.add_argument("--suite", action="append", choices=["starlette", "uvicorn"])
    parser.add_argument("--selftest", choices=["none", "quick", "full"], default="none")
    parser.add_argument(
        "--matrix-python",
        type=Path,
        default=_REPO / ".venv" / "bin" / "python",
        help="interpreter of the project venv that runs the server matrix",
    )
    parser.add_argument("--no-matrix", action="store_true", help="skip the server matrix")
    args = parser.parse_args()
    cache: Path = args.cache.resolve()
    suites = _suites(cache, {"starlette": args.starlette, "uvicorn": args.uvicorn})
    started = time.monotonic()
    ok = True
    if args.selftest != "full":
        for name in args.suite or list(suites):
            verdict = check_suite(suites[name], cache)
            print("\n".join(verdict.lines), flush=True)
            ok = ok and verdict.ok
    if args.selftest != "full" and not args.suite and not args.no_matrix:
        verdict = server_matrix(cache, args.matrix_python)
        print("\n".join(verdict.lines), flush=True)
        ok = ok and verdict.ok
    if args.selftest != "none":
        verdict = selftest(suites, cache, args.selftest)
        print("\n".join(verdict.lines), flush=True)
        ok = ok and verdict.ok
    print(f"conformance: {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
