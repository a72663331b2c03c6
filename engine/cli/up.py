"""``engine up``: the whole engine as one process tree (relay, daemon, API), demo data if asked.

Each part runs as its own ``engine`` child process, exactly as an operator
would run them separately, so ``up`` adds no code path of its own. The parent
supervises: a child that dies takes the tree down with a non-zero exit (a
process manager restarts it); SIGTERM or Ctrl-C stops the children in order
(API first, so no command is accepted while the rest shuts down) and waits,
bounded, for each to finish.

The daemon child is a plain ``engine run``, so it honours
``ENGINE_RUNNER__WORKERS`` like one started by hand: one per core by default,
its own supervisor restarting a worker that dies (:mod:`engine.supervisor`).
The API child likewise honours ``ENGINE_API__WORKERS`` (one by default).
``--workers`` and ``--api-workers`` are passed on to those children as their
own ``--workers``. ``up`` only sees each supervisor exit.

The daemon and the relay get a metrics port each (``/metrics`` and
``/health/*``: :mod:`engine.ops_server`), 18081 and 18082 unless set; the
API serves its own on its port.
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

from engine.cli.app import ExitCode, app, err_console, load_settings, run_reporting_errors
from engine.cli.write import _migrate_and_grant
from engine.settings import Settings
from engine.topics import ensure_topic

# Started in this order, stopped in the reverse one.
PARTS = ("relay", "run", "api")
# Where `up` has its daemon and its relay serve /metrics and /health (the API's port + 1, + 2).
DAEMON_METRICS_PORT = 18081
RELAY_METRICS_PORT = 18082
DEMO_WAIT_S = 300.0


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process


async def _start(part: str, log_level: str, options: list[str]) -> Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", part, "--log-level", log_level, *options
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


async def _load_demo(args: list[str]) -> dict[str, str]:
    """Run ``engine demo --json`` (its progress bar shows on stderr); its sample ids."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "demo", "--json", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise typer.Exit(process.returncode or ExitCode.FAILED)
    samples: dict[str, str] = json.loads(out).get("samples", {})
    return samples


def example_queries(base: str, samples: dict[str, str]) -> list[tuple[str, str]]:
    """Three queries that work on the demo data: a detail, a quick lookup and a search."""
    order = samples.get("order_id", "")
    text = samples.get("city") or samples.get("customer_name") or ""
    return [
        ("order details (PostgreSQL view)", f"curl -s {base}/orders/{order}"),
        ("quick lookup (Redis)", f"curl -s {base}/orders/{order}/quick"),
        ("search (Elasticsearch)", f"curl -s '{base}/search/orders?text={quote(text)}&size=3'"),
    ]


def _announce(
    settings: Settings, samples: dict[str, str] | None, projected: bool, ports: dict[str, int]
) -> None:
    base = f"http://{settings.api.host}:{settings.api.port}"
    # Plain lines, never wrapped: the commands must paste as they are.
    console = Console(soft_wrap=True, highlight=False)
    console.print("[bold green]engine is up[/bold green]")
    console.print(f"  API        {base}")
    console.print(f"  API docs   {base}/docs")
    console.print(f"  live page  {base}/")
    console.print("  status     engine status   (or GET /status)")
    console.print(f"  metrics    {base}/metrics   (the API's)")
    for part, title in (("run", "daemon"), ("relay", "relay")):
        if ports.get(part):
            ops = f"http://{settings.ops.host}:{ports[part]}"
            console.print(f"  {title:<10} {ops}/metrics   {ops}/health/ready")
    if samples and projected:
        console.print("\nTry these (the demo data is projected):")
        for title, command in example_queries(base, samples):
            console.print(f"  # {title}\n  {command}")
    elif samples:
        console.print(
            "\n[yellow]the projections have not applied the demo data yet[/yellow]: "
            "see engine status"
        )
    console.print("\nCtrl-C stops everything.")


async def _up(
    settings: Settings,
    log_level: str,
    demo_args: list[str] | None,
    options: dict[str, list[str]],
    ports: dict[str, int],
) -> int:
    await _migrate_and_grant(settings)
    await ensure_topic(settings.kafka)
    stop, died, halt = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        stop.set()
        halt.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    children: list[Child] = []
    try:
        for part in PARTS:
            children.append(await _start(part, log_level, options.get(part, [])))
        watchers = [asyncio.create_task(_watch(child, died, halt)) for child in children]
        base = f"http://{settings.api.host}:{settings.api.port}"
        if not await _wait_until_ok(f"{base}/health", time.monotonic() + 60, halt):
            if stop.is_set():
                return ExitCode.OK
            err_console().print("[red]error:[/red] the API did not come up (see its log above)")
            return ExitCode.UNAVAILABLE
        samples, projected = None, False
        if demo_args is not None:
            samples = await _load_demo(demo_args)
            projected = await _wait_for_demo(base, samples, halt)
        if not halt.is_set():
            _announce(settings, samples, projected, ports)
            await halt.wait()
        for watcher in watchers:
            watcher.cancel()
        return ExitCode.FAILED if died.is_set() and not stop.is_set() else ExitCode.OK
    finally:
        await _stop(children, settings.runner.shutdown_timeout_s + 5)


async def _wait_for_demo(base: str, samples: dict[str, str], halt: asyncio.Event) -> bool:
    """Wait (bounded) until the sample order answers in all three stores."""
    if not samples.get("order_id"):
        return False
    err_console().print("waiting for the projections to apply the demo data...")
    deadline = time.monotonic() + DEMO_WAIT_S
    (detail, _), (quick, _), (search, _) = (
        (url.split()[-1].strip("'"), title) for title, url in example_queries(base, samples)
    )
    return (
        await _wait_until_ok(detail, deadline, halt)
        and await _wait_until_ok(quick, deadline, halt)
        and await _wait_until_ok(search, deadline, halt, lambda body: bool(body and body["total"]))
    )


async def _watch(child: Child, died: asyncio.Event, halt: asyncio.Event) -> None:
    code = await child.process.wait()
    if not halt.is_set():
        err_console().print(f"[red]{child.name} exited with code {code}[/red]: stopping")
    died.set()
    halt.set()


@app.command()
def up(  # noqa: PLR0917 - one parameter per command-line option
    demo: Annotated[
        bool, typer.Option("--demo/--no-demo", help="Load the demo sample once the engine runs.")
    ] = False,
    customers: Annotated[
        int | None, typer.Option(min=1, help="Demo customers (default: engine demo's own).")
    ] = None,
    orders: Annotated[
        int | None, typer.Option(min=0, help="Demo orders (default: engine demo's own).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="The daemon's consumer processes (engine run --workers)."
            " Default: ENGINE_RUNNER__WORKERS; 0 means one per core.",
            show_default=False,
        ),
    ] = None,
    api_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="The API's server processes (engine api --workers)."
            " Default: ENGINE_API__WORKERS (1); 0 means one per core.",
            show_default=False,
        ),
    ] = None,
    daemon_metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="The daemon's /metrics and /health port (engine run --metrics-port)."
            " Default: ENGINE_RUNNER__METRICS_PORT, else 18081; 0 turns it off.",
            show_default=False,
        ),
    ] = None,
    relay_metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="The relay's /metrics and /health port (engine relay --metrics-port)."
            " Default: ENGINE_RELAY__METRICS_PORT, else 18082; 0 turns it off.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "warning",
) -> None:
    """Run the whole engine: migrate, then the outbox relay, the projection daemon and the API.

    The daemon runs ENGINE_RUNNER__WORKERS consumer processes (default: one per
    core) under its own supervisor, as `engine run` does; the API runs
    ENGINE_API__WORKERS server processes (default: one), as `engine api` does.

    The daemon and the relay serve /metrics, /health/live and /health/ready on
    ports 18081 and 18082 (see --daemon-metrics-port, --relay-metrics-port), the
    API on its own port.

    With --demo, also loads the demo sample, waits until it is projected and
    prints the URLs and example queries. Runs until SIGTERM/Ctrl-C; exits 1 if
    one of its processes dies, 3 on a configuration problem, 4 if a service is
    unreachable.
    """
    settings = load_settings()
    demo_args: list[str] | None = None
    if demo:
        demo_args = [*_flag("--customers", customers), *_flag("--orders", orders)]
    ports = {
        "run": _port(daemon_metrics_port, settings.runner.metrics_port, DAEMON_METRICS_PORT),
        "relay": _port(relay_metrics_port, settings.relay.metrics_port, RELAY_METRICS_PORT),
    }
    options = {
        "run": [*_flag("--workers", workers), "--metrics-port", str(ports["run"])],
        "api": _flag("--workers", api_workers),
        "relay": ["--metrics-port", str(ports["relay"])],
    }
    code = run_reporting_errors(
        lambda: asyncio.run(_up(settings, log_level, demo_args, options, ports))
    )
    raise typer.Exit(code)


def _port(option: int | None, setting: int | None, default: int) -> int:
    """The option, else the setting, else ``up``'s own default; 0 is off."""
    if option is not None:
        return option
    return setting if setting is not None else default


def _flag(name: str, value: int | None) -> list[str]:
    return [name, str(value)] if value is not None else []
