"""The operators' files under ``docker/``, checked with the real tools and a real exporter.

* Prometheus: ``promtool check config`` / ``check rules`` / ``test rules`` (the alert unit tests
  in ``docker/prometheus/alerts.test.yml``), and ``promtool check metrics`` on a real scrape of
  ``streambus metrics`` serving a swarm in which every metric has a value.
* Every metric name in the alert rules and the Grafana dashboard is one that real scrape
  exposes (a renamed metric would otherwise leave an alert that can never fire).
* ``docker/compose.yaml``, without a Docker engine: its services, every file it mounts, every
  port, the hosts and ports the config files point at, and each streambus command, parsed by
  the CLI's own parser.

promtool comes from Debian's ``prometheus`` package: the tests that run it are skipped without
it, and fail under ``STREAMBUS_REQUIRE_TOOLS=1`` (CI; see ``tests/tools.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from consumers.watchdog import Watchdog
from streambus.bus import Bus
from streambus.cli import build_parser
from streambus.keys import SwarmKeys
from streambus.liveness import Heartbeater
from streambus.logs import LOG_FORMATS
from tests.test_metrics import Scrape, exporter, get_metrics, scrape_until, time_out
from tests.tools import need

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "streambus.json"
OPERATIONS = ROOT / "docs" / "operations.md"

PROMETHEUS_OWN = {"up"}
"""Series Prometheus writes itself for every target."""
DASHBOARD_MUST_SHOW = ("blocking_coordinators", "blocking_coordinators_past_deadline",
                       "coordinators_reported_dead", "signal_delivery_latency_seconds_bucket",
                       "dead_letters_total", "stream_group_lag_entries", "bus_up")


def promtool(*args: str, stdin: str | None = None, cwd: Path = PROMETHEUS
             ) -> subprocess.CompletedProcess[str]:
    tool = need("promtool", "from Debian's prometheus package")
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=cwd, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


# -- Prometheus config and rules -------------------------------------------------------------------

def test_the_prometheus_config_is_valid_and_loads_the_rules() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_the_alert_rules_are_valid() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(alert_rules())} rules found" in done.stdout


def test_the_alert_unit_tests_pass() -> None:
    done = promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [case for test in load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
             for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no quiet case"


def test_the_alert_unit_tests_catch_a_broken_alert(tmp_path: Path) -> None:
    """The rule tests have teeth: an alert with a loosened threshold fails them."""
    for name in ("alerts.yml", "alerts.test.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    text = rules.read_text()
    loosened = "blocking_past_deadline_seconds_max > 0"
    rules.write_text(text.replace("blocking_past_deadline_seconds_max > 60", loosened))
    assert loosened in rules.read_text()
    done = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "StreambusWaitPastDeadline" in done.stdout + done.stderr


def test_every_alert_says_how_bad_what_and_where_the_runbook_is() -> None:
    anchors = {github_anchor(line.lstrip("#").strip())
               for line in OPERATIONS.read_text().splitlines() if line.startswith("#")}
    for rule in alert_rules():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"], rule["alert"]
        assert notes["description"], rule["alert"]
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "docs/operations.md"
        assert anchor == rule["alert"].lower()
        assert anchor in anchors, f"no section {anchor} in {path}"


def test_the_docs_state_each_alert_as_alerts_yml_does() -> None:
    docs = OPERATIONS.read_text()
    for rule in alert_rules():
        section = docs.partition(f"### {rule['alert']}\n")[2].partition("\n### ")[0]
        expr = " ".join(rule["expr"].split())
        fires = (f"Fires: `{expr}` for `{rule['for']}`, severity "
                 f"`{rule['labels']['severity']}`.")
        assert fires in section, f"{rule['alert']}: the docs should say {fires}"
    assert f"holds {NUMBERS[len(alert_rules())]} Prometheus alert rules" in docs


NUMBERS = dict(enumerate(["no", "one", "two", "three", "four", "five", "six", "seven", "eight",
                          "nine", "ten"]))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


# -- a real scrape ---------------------------------------------------------------------------------

async def populated_scrape(bus: Bus) -> str:
    """The exporter's text for a swarm where every metric has a value (not only zeros)."""
    swarm, keys = "ops", bus.keys("ops")
    await bus._store.begin_wait(keys, "crashed", "stuck", 50, 0)  # nobody will end this wait
    await time_out(bus, swarm, "late", "slow", 0.05)  # ... and its deadline is now past
    beater = Heartbeater(bus._store, keys, "gone", interval=1.0)
    await beater.beat_once()
    await bus._store.begin_wait(keys, "gone", "go", 60_000, 0)  # then it stops beating
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(bus.wait_for, swarm, "fine", "go", timeout=30))
        await bus.publish(swarm, "go", "now", await_acks=["fine"])
    await bus._store.raw().xadd(keys.events, {"e": b"not json"})  # a poison entry
    watchdog = Watchdog(bus, swarm, dead_after=0.05)
    reported: set[str] = set()
    with anyio.fail_after(10):
        while "gone" not in reported:  # it lapses 50 ms after its beat (server time)
            reported.update(await watchdog.check())
            await anyio.sleep(0.01)
    async with exporter(bus, [swarm]) as port:
        await scrape_until(port, lambda s: (
            s.value("dead_letters_total", swarm=swarm) == 1
            and s.value("coordinator_dead_events_total", swarm=swarm) == 1
            and s.value("signal_delivery_latency_seconds_count", swarm=swarm) == 1
            and s.value("blocking_coordinators_past_deadline", swarm=swarm) == 1
            and s.value("coordinators_reported_dead", swarm=swarm, state="waiting") == 1))
        return await anyio.to_thread.run_sync(get_metrics, port)


@pytest.fixture
async def exposed(bus: Bus) -> str:
    return await populated_scrape(bus)


@pytest.mark.anyio
async def test_a_real_scrape_passes_promtool_check_metrics(exposed: str) -> None:
    done = promtool("check", "metrics", stdin=exposed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""


def test_promtool_check_metrics_flags_what_breaks_the_conventions() -> None:
    """The check above can fail: a counter without ``_total`` and a non-base unit are flagged."""
    bad = ("# HELP signals_sent Signals.\n# TYPE signals_sent counter\nsignals_sent 1\n"
           "# HELP ack_wait_milliseconds ACK wait.\n# TYPE ack_wait_milliseconds gauge\n"
           "ack_wait_milliseconds 3\n")
    done = promtool("check", "metrics", stdin=bad)
    assert done.returncode != 0
    assert '"_total" suffix' in done.stdout + done.stderr
    assert 'base unit "seconds"' in done.stdout + done.stderr


@pytest.mark.anyio
async def test_alerts_and_dashboard_name_only_metrics_the_exporter_exposes(exposed: str) -> None:
    scrape = Scrape(exposed)
    names = {s.name for s in scrape.samples} | set(scrape.families) | PROMETHEUS_OWN
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= names, rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]
    used = set()
    for expr in dashboard_exprs():
        assert metric_names(expr) <= names, expr
        used |= metric_names(expr)
    assert set(DASHBOARD_MUST_SHOW) <= used
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for variable in variables:
        found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
        assert found is not None, variable
        assert found[1] in names
        assert found[2] in {k for s in scrape.samples if s.name == found[1] for k in s.labels}


@pytest.mark.anyio
async def test_the_docs_list_every_metric_the_exporter_exposes(exposed: str) -> None:
    section = OPERATIONS.read_text().partition("\n## Metrics\n")[2].partition("\n## ")[0]
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    families = Scrape(exposed).families
    # prometheus_client names a counter family without its _total suffix.
    exposed_names = {name + ("_total" if f.type == "counter" else "")
                     for name, f in families.items()}
    assert exposed_names == listed


# -- PromQL metric names ---------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*(?![\w(])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _NAME.findall(expr) if name.lower() not in _KEYWORDS}


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (swarm, le) (rate(a_bucket{x="}"}[5m]))) > 1e3',
     {"a_bucket"}),
    ('min_over_time(lag{g=~"p\\\\..+"}[10m]) > 0 and delta(lag[10m]) >= 0', {"lag"}),
    ("sum without (le) (x) / on (swarm) group_left (state) y offset 5m", {"x", "y"}),
    ('up{job="streambus"} == 0 unless dead_leters_total', {"up", "dead_leters_total"}),
    ("sum by (le) (increase(h{s=~\"$swarm\"}[$__rate_interval]))", {"h"}),
])
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables filled in) as a recording rule."""
    rules = [{"record": f"dashboard:query{n}", "expr": expr.replace(
        "$__rate_interval", "1m").replace("$swarm", ".*")}
        for n, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


# -- Grafana ---------------------------------------------------------------------------------------

def test_the_dashboard_parses_and_every_panel_queries_the_provisioned_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = load_yaml(DOCKER / "grafana/provisioning/datasources/streambus.yml")
    prometheus = next(d for d in datasources["datasources"] if d["type"] == "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["uid"] == "streambus"
    assert {p["type"] for p in panels} >= {"timeseries", "heatmap", "stat"}
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == prometheus["uid"], panel["title"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))


# -- docker/compose.yaml ---------------------------------------------------------------------------

STREAMBUS_SERVICES = {"streambus-metrics", "streambus-dashboard", "streambus-traces",
                      "streambus-watchdog", "demo"}
SERVICES = STREAMBUS_SERVICES | {"redis", "prometheus", "grafana", "otel-collector", "jaeger"}
PENDING_COMMANDS = {"dashboard": {"--host", "--port"}}
"""Commands another branch adds: checked against their planned options until the CLI has them."""
LISTENS = {"redis": {6379}, "prometheus": {9090}, "grafana": {3000}, "jaeger": {16686, 4317}}
"""Ports the third-party images listen on (their defaults; the stack does not change them)."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = load_yaml(DOCKER / "compose.yaml")
    return parsed


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}``, as on a machine where VAR is not set."""
    def default(found: re.Match[str]) -> str:
        assert found[2] is not None, f"${{{found[1]}}} has no default: compose would fail"
        return found[2]
    return _VARIABLE.sub(default, text)


def streambus_args(service: dict[str, Any]) -> list[str]:
    return [interpolate(arg) for arg in service["command"]]


def parse_cli(args: list[str]) -> argparse.Namespace:
    """Parse a streambus command line with the CLI's own parser (no side effects)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if args[0] not in commands.choices and args[0] in PENDING_COMMANDS:
        options = dict(zip(args[1::2], args[2::2], strict=True))
        assert set(options) <= PENDING_COMMANDS[args[0]], args
        return argparse.Namespace(command=args[0], host=options.get("--host"),
                                  port=int(options["--port"]))
    return parser.parse_args(args)


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """(path in the repository, path in the container) of each bind mount."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            yield (DOCKER / source).resolve(), target


def in_repo(service: dict[str, Any], container_path: str) -> Path:
    """The repository file a container path of ``service`` is mounted from."""
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted from the repository")


def host_port(url: str) -> tuple[str, int]:
    found = re.fullmatch(r"(?:\w+://)?([\w.-]+):(\d+)(?:/.*)?", url)
    assert found is not None, url
    return found[1], int(found[2])


def listens(compose: dict[str, Any], name: str) -> set[int]:
    """The ports service ``name`` listens on, from its command or config."""
    service = compose["services"][name]
    if name == "otel-collector":
        config = load_yaml(in_repo(service, "/etc/otelcol/config.yaml"))
        protocols = config["receivers"]["otlp"]["protocols"]
        return {host_port(p["endpoint"])[1] for p in protocols.values()}
    if name in STREAMBUS_SERVICES:
        port = getattr(parse_cli(streambus_args(service)), "port", None)
        return set() if port is None else {port}
    return LISTENS[name]


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES
    for service in compose["services"].values():
        for needed in service.get("depends_on", []):
            assert needed in SERVICES


def test_redis_keeps_an_append_only_file(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("everysec", "always")
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


def test_every_mounted_file_is_in_the_repository(compose: dict[str, Any]) -> None:
    volumes = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        build = service.get("build")
        if build is not None:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file()


def test_the_config_files_the_containers_are_told_to_read_are_mounted(
    compose: dict[str, Any]
) -> None:
    services = compose["services"]
    config = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert in_repo(services["prometheus"], config.partition("=")[2]).is_file()
    collector = services["otel-collector"]["command"][0].partition("=")[2]
    assert in_repo(services["otel-collector"], collector).is_file()
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_repo(grafana, home) == DASHBOARD
    assert in_repo(grafana, "/etc/grafana/provisioning/datasources").is_dir()
    providers = load_yaml(in_repo(grafana, "/etc/grafana/provisioning/dashboards/streambus.yml"))
    assert in_repo(grafana, providers["providers"][0]["options"]["path"]) == DASHBOARD.parent


def test_every_port_is_published_on_loopback_once_to_a_port_the_service_listens_on(
    compose: dict[str, Any]
) -> None:
    published: list[int] = []
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            address, outside, inside = mapping.split(":")
            assert address == "127.0.0.1", f"{name} publishes {mapping} beyond this host"
            assert int(inside) in listens(compose, name), f"{name}: nothing on {inside}"
            published.append(int(outside))
    assert len(published) == len(set(published))


def test_the_streambus_services_run_valid_commands(compose: dict[str, Any]) -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["streambus"]' in dockerfile  # so `command` is the CLI's arguments
    commands = {}
    for name in STREAMBUS_SERVICES:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        args = parse_cli(streambus_args(service))
        commands[args.command] = args
        if (swarm := getattr(args, "swarm", None)) is not None:
            SwarmKeys.for_swarm("streambus", swarm)  # a valid id
        environment = service.get("environment", {})
        assert host_port(environment["STREAMBUS_REDIS_URL"]) == ("redis", 6379)
        assert environment.get("STREAMBUS_LOG_FORMAT", "text") in LOG_FORMATS
    assert set(commands) == {"metrics", "dashboard", "traces", "watchdog", "demo"}
    for served in ("metrics", "dashboard"):  # reachable from the other containers
        assert commands[served].host == "0.0.0.0"


def test_the_services_point_at_each_other(compose: dict[str, Any]) -> None:
    services = compose["services"]
    scrape = load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"][0]
    targets = [host_port(t) for c in scrape["static_configs"] for t in c["targets"]]
    assert targets == [("streambus-metrics", *listens(compose, "streambus-metrics"))]
    assert scrape["metrics_path"] == "/metrics"
    endpoint = services["streambus-traces"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    collector = load_yaml(DOCKER / "otel/collector.yaml")
    http = host_port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1]
    assert host_port(endpoint) == ("otel-collector", http)
    for exporter_name in collector["service"]["pipelines"]["traces"]["exporters"]:
        host, port = host_port(collector["exporters"][exporter_name]["endpoint"])
        assert host in services
        assert port in listens(compose, host)
    pipeline = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(collector[kind])
    datasources = load_yaml(DOCKER / "grafana/provisioning/datasources/streambus.yml")
    for source in datasources["datasources"]:
        host, port = host_port(source["url"])
        assert port in listens(compose, host), source["name"]
