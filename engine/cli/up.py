"""``engine up``: the whole engine as one process tree (relay, daemon, API), demo data if asked.

Each part runs as its own ``engine`` child process, exactly as an operator
would run them separately, so ``up`` adds no code path of its own. The parent
supervises: a child that dies takes the tree down with a non-zero exit (a
process manager restarts it); SIGTERM or Ctrl-C stops the children in order
(API first, so no command is accepted while the rest shuts down) and waits,
bounded, for each to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.panel import Panel

from engine.cli.app import ExitCode, app, err_console, load_settings, run_reporting_errors
from engine.cli.write import _migrate_and_grant
from engine.settings import Settings
from engine.topics import ensure_topic

# Started in this order, stopped in the reverse one.
PARTS = ("relay", "run", "api")


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process


async def _start(part: str, log_level: str) -> Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", part, "--log-level", log_level
    )
    return Child(part, process)


async def _stop(children: list[Child], timeout_s: float) -> None:
    for child in reversed(children):
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.terminate()
            try:
                await asyncio.wait_for(child.process.wait(), timeout_s)
            except TimeoutError:
                err_console().print(f"{child.name} did not stop in {timeout_s:.0f}s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """GET ``url``: status and decoded JSON (blocking: call it in a thread)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


def _any(_body: Any) -> bool:
    return True


async def _wait_until_ok(
    url: str, deadline: float, died: asyncio.Event, accept: Callable[[Any], bool] = _any
) -> bool:
    """Poll ``url`` until it answers 200 with a body ``accept`` likes (or time is up)."""
    while time.monotonic() < deadline and not died.is_set():
        code, body = await asyncio.to_thread(_get, url)
        if code == 200 and accept(body):
            return True
        await asyncio.sleep(0.5)
    return False


async def _load_demo(args: list[str]) -> dict[str, Any]:
    """Run ``engine demo --json`` (its progress bar shows on stderr); its summary."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "demo", "--json", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise typer.Exit(process.returncode or ExitCode.FAILED)
    summary: dict[str, Any] = json.loads(out)
    return summary


def example_queries(base: str, samples: dict[str, str]) -> list[tuple[str, str]]:
    """Three queries that work on the demo data: a detail, a quick lookup and a search."""
    order = samples.get("order_id", "")
    text = samples.get("city") or samples.get("customer_name") or ""
    return [
        ("order details (PostgreSQL view)", f"curl -s {base}/orders/{order}"),
        ("quick lookup (Redis)", f"curl -s {base}/orders/{order}/quick"),
        ("search (Elasticsearch)", f"curl -s '{base}/search/orders?text={quote(text)}&size=3'"),
    ]


def _announce(settings: Settings, samples: dict[str, str] | None) -> None:
    base = f"http://{settings.api.host}:{settings.api.port}"
    lines = [
        f"API        {base}",
        f"API docs   {base}/docs",
        "status     engine status",
    ]
    if samples:
        lines.append("")
        lines.append("Try (the demo data is projected):")
        for title, command in example_queries(base, samples):
            lines += [f"  # {title}", f"  {command}"]
    lines += ["", "Ctrl-C stops everything."]
    Console().print(Panel("\n".join(lines), title="engine is up", expand=False), highlight=False)


async def _up(settings: Settings, log_level: str, demo_args: list[str] | None) -> int:
    await _migrate_and_grant(settings)
    await ensure_topic(settings.kafka)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    died = asyncio.Event()
    try:
        for part in PARTS:
            children.append(await _start(part, log_level))
        watchers = [asyncio.create_task(_watch(child, died)) for child in children]
        base = f"http://{settings.api.host}:{settings.api.port}"
        if not await _wait_until_ok(f"{base}/health", time.monotonic() + 60, died):
            err_console().print("[red]error:[/red] the API did not come up (see its log above)")
            return ExitCode.UNAVAILABLE
        samples = await _demo(base, demo_args, died) if demo_args is not None else None
        _announce(settings, samples)
        await _first(stop, died)
        for watcher in watchers:
            watcher.cancel()
        return ExitCode.FAILED if died.is_set() and not stop.is_set() else ExitCode.OK
    finally:
        await _stop(children, settings.runner.shutdown_timeout_s + 5)


async def _demo(base: str, demo_args: list[str], died: asyncio.Event) -> dict[str, str]:
    summary = await _load_demo(demo_args)
    samples: dict[str, str] = summary.get("samples", {})
    if samples.get("order_id"):
        err_console().print("waiting for the projections to apply the demo data...")
        deadline = time.monotonic() + 300
        (detail, _), (quick, _), (search, _) = (
            (url.split()[-1].strip("'"), title) for title, url in example_queries(base, samples)
        )
        await _wait_until_ok(detail, deadline, died)
        await _wait_until_ok(quick, deadline, died)
        await _wait_until_ok(search, deadline, died, lambda body: bool(body and body["total"]))
    return samples


async def _watch(child: Child, died: asyncio.Event) -> None:
    code = await child.process.wait()
    err_console().print(f"[red]{child.name} exited with code {code}[/red]")
    died.set()


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option("--demo/--no-demo", help="Load the demo sample once the engine runs.")
    ] = False,
    customers: Annotated[
        int | None, typer.Option(min=1, help="Demo customers (default: engine demo's own).")
    ] = None,
    orders: Annotated[
        int | None, typer.Option(min=0, help="Demo orders (default: engine demo's own).")
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "warning",
) -> None:
    """Run the whole engine: migrate, then the outbox relay, the projection daemon and the API.

    With --demo, also loads the demo sample, waits until it is projected and
    prints the URLs and example queries. Runs until SIGTERM/Ctrl-C; exits 1 if
    one of its processes dies, 3 on a configuration problem, 4 if a service is
    unreachable.
    """
    settings = load_settings()
    demo_args: list[str] | None = None
    if demo:
        demo_args = [*_flag("--customers", customers), *_flag("--orders", orders)]
    code = run_reporting_errors(lambda: asyncio.run(_up(settings, log_level, demo_args)))
    raise typer.Exit(code)


def _flag(name: str, value: int | None) -> list[str]:
    return [name, str(value)] if value is not None else []
