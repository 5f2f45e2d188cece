"""What the container test (tests/integration/test_containers.py) cannot see by running.

Everything else about the Dockerfile, the compose file and the monitoring is checked by
building and running them: image, healthcheck, user, web views, SIGTERM, compose stack,
Prometheus, alert rules and dashboard queries. These are the properties a run misses:
offline the registry images are replaced by stand-ins (so the pinned versions are not the
ones that ran), Grafana cannot run here at all, and a misspelt COUPON_* variable or a port
published on every interface works just as well in a test.
"""

import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from coupon_stream.foundation.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
GRAFANA = ROOT / "infra" / "grafana"
SETTINGS_ENV = {f"COUPON_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def kafka_version_from_pom():
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(ROOT / "infra" / "kafka" / "pom.xml").getroot()
    version = root.find("m:properties/m:kafka.version", ns)
    assert version is not None and version.text is not None
    return version.text.strip()


def test_images_are_pinned_and_fully_qualified(services):
    # Offline, stand-ins run under these names, so a run cannot tell a wrong tag.
    for name, service in services.items():
        image = service["image"]
        registry, _, rest = image.partition("/")
        assert "." in registry or registry == "localhost", (name, image)
        assert ":" in rest and not rest.endswith(":latest"), (name, image)
    assert services["kafka"]["image"] == f"docker.io/apache/kafka:{kafka_version_from_pom()}"
    assert services["create-topics"]["image"] == services["kafka"]["image"]


def test_mysql_is_the_84_lts_line_with_its_default_authentication(services):
    # The offline stand-in is MariaDB, which has no caching_sha2_password: only the file
    # says what production runs. 8.0 reached end of life in April 2026.
    mysql = services["mysql"]
    assert mysql["image"] == "docker.io/library/mysql:8.4"
    assert "native_password" not in json.dumps(mysql.get("command", ""))
    assert "default-authentication-plugin" not in json.dumps(mysql.get("command", ""))


def test_no_standby_replicas(services):
    # README, "Scaling and takeover": standbys cost about half the throughput.
    assert env_of(services["worker"]).get("COUPON_STANDBY_REPLICAS", "0") == "0"


def test_published_ports_bind_to_localhost_only(services):
    for name, service in services.items():
        for port in service.get("ports") or []:
            spec = port if isinstance(port, str) else port.get("host_ip", "")
            assert str(spec).startswith("127.0.0.1:"), (name, port)


def test_every_coupon_variable_is_a_setting():
    # Settings ignore unknown variables, so a misspelt one silently does nothing.
    dockerfile_env = set()
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in re.findall(r"^ENV (.+)$", joined, re.M):
        dockerfile_env |= {w.split("=", 1)[0] for w in shlex.split(line)}
    used = set(re.findall(r"\bCOUPON_[A-Z0-9_]+\b", COMPOSE.read_text()))
    used |= {name for name in dockerfile_env if name.startswith("COUPON_")}
    assert "COUPON_WEB_HOST" in used
    assert used - SETTINGS_ENV == set()


def test_build_context_is_only_what_the_dockerfile_copies():
    # The build would succeed with more; local state and secrets would only reach the
    # builder. So the context is an allowlist of the COPY sources.
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M):
        copied |= {w.rstrip("/") for w in shlex.split(line)[:-1]}
    assert allowed == copied


# -- Grafana: not in Debian's archive, so it never runs here -------------------------------


def test_grafana_provisioning_matches_the_compose_mounts_and_the_dashboard(services):
    grafana = services["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./infra/grafana/provisioning"
    (datasource,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "coupon-stream.yml").read_text()
    )["providers"]
    dashboards = provider["options"]["path"]
    assert mounts[dashboards] == "./infra/grafana/dashboards"
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / mounts[dashboards] / Path(home).relative_to(dashboards)).is_file()

    dashboard = json.loads((GRAFANA / "dashboards" / "coupon-stream.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    uids = {datasource["uid"]}
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
            assert target["expr"] and target["refId"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] in uids


def test_the_secured_compose_variant_is_settings_the_worker_accepts(tmp_path):
    """docker-compose.secured.yml: every variable a setting, every file a mounted secret."""
    from tests import certs

    secured = yaml.safe_load((ROOT / "docker-compose.secured.yml").read_text())
    worker = secured["services"]["worker"]
    env = env_of(worker)
    assert set(env) <= SETTINGS_ENV
    mounted = {f"/run/secrets/{s['target']}": s["source"] for s in worker["secrets"]}
    files = {k: v for k, v in env.items() if k.endswith("_FILE")}
    assert set(files.values()) == set(mounted)
    assert {s: secured["secrets"][s]["file"] for s in mounted.values()}  # each one declared
    # The worker takes them: certificates stand in for the mounted files, the interpolated
    # passwords for the operator's.
    pem = certs.make(tmp_path)["ca"].cert
    values = {
        k: str(pem) if k in files else re.sub(r"\$\{[^}]*\}", "pw", v) for k, v in env.items()
    }
    settings: dict[str, Any] = {k[len("COUPON_") :].lower(): v for k, v in values.items()}
    s = Settings(**settings)
    assert s.kafka_security_protocol == "SASL_SSL" and s.kafka_tls() is not None
    assert s.db_tls() is not None


def test_the_secured_variant_s_secrets_are_never_committed():
    """docker-compose.secured.yml asks for `.env` and `secrets/` next to the code: git must
    ignore both, or a `git add .` commits a password and private keys."""
    import subprocess

    said = (ROOT / "docker-compose.secured.yml").read_text()
    assert ".env" in said and "secrets/" in said
    for path in (".env", "secrets/kafka-ca.pem", "secrets/client.key"):
        ignored = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False
        )
        assert ignored.returncode == 0, f"{path} is not ignored by git"
