"""docker-compose.yml cannot run here (no Docker engine); hold it to the settings instead.

The monitoring half (Prometheus, its alerts, Grafana's provisioning and dashboard) is
held to the engine's metrics: every name a query uses must be one the engine exposes
(engine.metrics.METRIC_NAMES), and every port Prometheus scrapes one the engine serves.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import Histogram
from pydantic import BaseModel

from engine import metrics
from engine.cli.up import DAEMON_METRICS_PORT, RELAY_METRICS_PORT
from engine.metrics import METRIC_NAMES
from engine.settings import Settings, env_var
from engine.stack.versions import ELASTICSEARCH_VERSION, KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "redis", "kafka", "elasticsearch")
PROMETHEUS = ROOT / "config" / "prometheus"
GRAFANA = ROOT / "config" / "grafana"
# Histograms by base name (PromQL reads them as _bucket, _sum and _count series).
HISTOGRAMS = frozenset(
    m.describe()[0].name for m in vars(metrics).values() if isinstance(m, Histogram)
)

pytestmark = pytest.mark.usefixtures("clean_env")


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _host_ports(service: dict[str, Any]) -> set[int]:
    # "127.0.0.1:54329:5432" -> 54329
    return {int(spec.split(":")[-2]) for spec in service.get("ports", [])}


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def _container_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the engine's container runs with (config/docker.env)."""
    for key, value in _env_file(ROOT / "config" / "docker.env").items():
        monkeypatch.setenv(key, value)
    return Settings()


def _yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), path
    return loaded


def _host_path(service: dict[str, Any], inside: str) -> Path:
    """The file in this repository a path inside the service's container comes from."""
    mounts = [spec.split(":")[:2] for spec in service.get("volumes", [])]
    binds = [(src, dst) for src, dst in mounts if src.startswith("./")]  # not named volumes
    path = PurePosixPath(inside)
    matching = [
        (s, d) for s, d in binds if path == PurePosixPath(d) or PurePosixPath(d) in path.parents
    ]
    assert matching, f"{inside} is not mounted from the repository"
    source, target = max(matching, key=lambda m: len(m[1]))  # the innermost mount wins
    return ROOT / source / path.relative_to(target)


# -- PromQL: which metric names an expression reads -----------------------------------

_PROMQL_NOT_NAMES = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # strings: label values
    r"|\{[^}]*\}"  # label matchers
    r"|\[[^\]]*\]"  # ranges and subqueries
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"  # label lists
    r"|\$\w+"  # Grafana variables
)
# An identifier at a word boundary (so not the "e3" of 1e3 nor the "m" of 5m), and
# whether a "(" follows it (a function or an aggregation, not a metric).
_PROMQL_IDENTIFIER = re.compile(r"\b([A-Za-z_][\w:]*)(\s*\()?")
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
)


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads, as written (histogram suffixes kept)."""
    bare = _PROMQL_NOT_NAMES.sub(" ", expr)
    return {
        name
        for name, call in _PROMQL_IDENTIFIER.findall(bare)
        if not call and name.lower() not in _PROMQL_KEYWORDS
    }


def _family(name: str) -> str | None:
    """The engine's metric family a series name belongs to; None if it is not one."""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    if base != name and base in HISTOGRAMS:
        return base
    if name in METRIC_NAMES and name not in HISTOGRAMS:  # a histogram has no bare series
        return name
    return None


def _alert_rules() -> list[dict[str, Any]]:
    rules = _yaml(PROMETHEUS / "alerts.yml")
    return [rule for group in rules["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded = json.loads((GRAFANA / "dashboards" / "engine.json").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _datasource() -> dict[str, Any]:
    (source,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert isinstance(source, dict)
    return source


def test_every_service_is_published_on_the_port_the_settings_expect() -> None:
    services = _compose()["services"]
    defaults = Settings()
    expected = {
        "postgres": defaults.postgres.port,
        "redis": defaults.redis.port,
        "kafka": defaults.kafka.first_host_port()[1],
        "elasticsearch": defaults.elasticsearch.host_port()[1],
    }
    for name in SERVICES:
        assert name in services, f"docker-compose.yml lacks the {name} service"
        assert expected[name] in _host_ports(services[name]), name


def test_kafka_runs_kraft_and_advertises_the_host_listener() -> None:
    kafka = _compose()["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "EXTERNAL://127.0.0.1:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_elasticsearch_is_single_node_without_security_at_the_pinned_version() -> None:
    es = _compose()["services"]["elasticsearch"]
    assert es["image"] == f"elasticsearch:{ELASTICSEARCH_VERSION}"
    assert es["environment"]["discovery.type"] == "single-node"
    assert es["environment"]["xpack.security.enabled"] == "false"


def test_postgres_credentials_match_the_settings() -> None:
    env = _compose()["services"]["postgres"]["environment"]
    pg = Settings().postgres
    assert env["POSTGRES_USER"] == pg.user
    assert env["POSTGRES_PASSWORD"] == pg.password.get_secret_value()
    assert env["POSTGRES_DB"] == pg.database


def test_engine_containers_reach_services_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = _compose()
    engine_services = [s for s in compose["services"].values() if "build" in s]
    assert engine_services, "docker-compose.yml runs none of the engine's own processes"
    for service in engine_services:
        assert set(service["depends_on"]) == set(SERVICES)
        assert service["env_file"] == ["config/docker.env"]
    inside = _container_settings(monkeypatch)
    assert inside.postgres.host == "postgres"
    assert inside.redis.host == "redis"
    assert inside.kafka.first_host_port() == ("kafka", 9092)
    assert inside.elasticsearch.host_port() == ("elasticsearch", 9200)


def test_the_engine_container_runs_the_whole_engine_and_publishes_the_api() -> None:
    engine = _compose()["services"]["engine"]
    assert engine["command"][:2] == ["up", "--demo"]
    assert Settings().api.port in _host_ports(engine)
    assert _env_file(ROOT / "config" / "docker.env")["ENGINE_API__HOST"] == "0.0.0.0"


def test_the_env_example_documents_every_setting_with_its_default() -> None:
    documented = _env_file(ROOT / "config" / "engine.env.example")
    example = (ROOT / "config" / "engine.env.example").read_text()
    for section, model in Settings():
        if not isinstance(model, BaseModel):
            assert documented[f"ENGINE_{section.upper()}"] == str(model)
            continue
        for field, value in model:
            name = env_var(section, field)
            if value is None:  # unset by default: documented as a commented-out line
                assert f"# {name}=" in example, f"{name} missing from config/engine.env.example"
                continue
            assert name in documented, f"{name} missing from config/engine.env.example"
            shown = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            assert documented[name] == str(shown), name


# -- monitoring: Prometheus and Grafana --------------------------------------------------


def test_monitoring_images_are_pinned_and_every_port_is_on_localhost() -> None:
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin a version ({image})"
    for name, service in services.items():
        for spec in service.get("ports", []):
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec} beyond localhost"


def test_prometheus_scrapes_every_engine_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    inside = _container_settings(monkeypatch)
    assert inside.ops.host == "0.0.0.0", "the metrics ports must listen beyond the container"
    # The container runs `engine up`: the ports it picks by itself, set explicitly.
    assert inside.runner.metrics_port == DAEMON_METRICS_PORT
    assert inside.relay.metrics_port == RELAY_METRICS_PORT
    engine_ports = {inside.api.port, inside.runner.metrics_port, inside.relay.metrics_port}
    scraped: set[tuple[str, int]] = set()
    for job in _yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                scraped.add((host, int(port)))
    assert scraped == {("engine", port) for port in engine_ports}
    # Published on the host too, for a look at /metrics and /health/ready by hand.
    assert engine_ports <= _host_ports(_compose()["services"]["engine"])


def test_prometheus_reads_its_config_and_alert_rules_from_the_repository() -> None:
    prometheus = _compose()["services"]["prometheus"]
    (flag,) = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config_file = _host_path(prometheus, flag.split("=", 1)[1])
    assert config_file == PROMETHEUS / "prometheus.yml"
    rule_files = _yaml(config_file)["rule_files"]
    assert rule_files, "Prometheus loads no alert rules"
    for rule_file in rule_files:  # relative to the config file, as Prometheus reads them
        assert (config_file.parent / rule_file).is_file(), rule_file


def test_every_alert_reads_only_metrics_the_engine_exposes() -> None:
    rules = _alert_rules()
    read: set[str] = set()
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        names = _metric_names(rule["expr"])
        assert names, f"{name} reads no metric"
        unknown = {n for n in names if n != "up" and _family(n) is None}
        assert not unknown, f"{name} reads metrics the engine does not expose: {unknown}"
        read |= names
    # What an operator must hear about: a stalled projection or relay, lag that stays
    # high, dead letters and parked aggregates, a process gone, a status gone blind.
    for needed in (
        "engine_projection_stalled",
        "engine_relay_stalled",
        "engine_projection_lag_seconds",
        "engine_projection_dead_letters",
        "engine_projection_parked_aggregates",
        "up",
        "engine_status_sample_ok",
    ):
        assert needed in read, f"no alert on {needed}"


def test_the_dashboard_shows_every_metric_and_only_those(monkeypatch: pytest.MonkeyPatch) -> None:
    dashboard = _dashboard()
    shown: set[str] = set()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = _metric_names(target["expr"])
            assert names, f"panel {panel['title']!r} reads no metric"
            unknown = {n for n in names if n != "up" and _family(n) is None}
            assert not unknown, f"panel {panel['title']!r} reads unknown metrics: {unknown}"
            shown |= {_family(n) or n for n in names}
    assert not METRIC_NAMES - shown, f"no panel shows {sorted(METRIC_NAMES - shown)}"
    for variable in dashboard["templating"]["list"]:
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert metric and metric[1] in METRIC_NAMES, f"variable {variable['name']}: {query}"


def test_grafana_provisions_the_dashboard_file_from_the_repository() -> None:
    grafana = _compose()["services"]["grafana"]
    assert _host_path(grafana, "/etc/grafana/provisioning") == GRAFANA / "provisioning"
    (provider,) = _yaml(GRAFANA / "provisioning" / "dashboards" / "engine.yml")["providers"]
    folder = _host_path(grafana, provider["options"]["path"])
    assert folder == GRAFANA / "dashboards"
    assert (folder / "engine.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(grafana, home) == GRAFANA / "dashboards" / "engine.json"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_grafana_reads_the_prometheus_service_and_the_dashboard_uses_that_source() -> None:
    services = _compose()["services"]
    source = _datasource()
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    container_ports = {int(spec.split(":")[-1]) for spec in services["prometheus"]["ports"]}
    assert url.port in container_ports
    assert "prometheus" in services["grafana"].get("depends_on", [])
    for panel in _panels(_dashboard()["panels"]):
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"]["uid"] == source["uid"], panel["title"]


def test_promql_names_are_read_past_functions_labels_ranges_and_numbers() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, store) (rate(engine_x_bucket{a="b c",'
        ' p=~"$projection"}[$__rate_interval]))) > 1e3 or on(job) up offset 5m'
        " unless max without (partition) (engine_y)"
    )
    assert _metric_names(expr) == {"engine_x_bucket", "up", "engine_y"}
    assert HISTOGRAMS and HISTOGRAMS <= METRIC_NAMES
    histogram = next(iter(HISTOGRAMS))
    assert _family(f"{histogram}_bucket") == histogram
    assert _family(histogram) is None  # a histogram is read through its series
    assert _family("engine_projection_stalled") == "engine_projection_stalled"
    assert _family("engine_projection_stalled_count") is None
