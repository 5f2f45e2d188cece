"""Static checks of Dockerfile, .dockerignore and docker-compose.yml (no Docker needed)."""

import fnmatch
import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from coupon_stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KAFKA_POM = ROOT / "infra" / "kafka" / "pom.xml"

COUPON_NAME = re.compile(r"\bCOUPON_[A-Z0-9_]+\b")
SETTINGS_ENV = {f"COUPON_{name.upper()}" for name in Settings.model_fields}


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text())


def parse_dockerfile(text):
    """[(INSTRUCTION, argument string)] with comments dropped and continuations joined."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def args_of(instructions, keyword):
    return [args for kw, args in instructions if kw == keyword]


def exec_form(args):
    """The list of a JSON (exec form) argument, or the shell-split words otherwise."""
    try:
        value = json.loads(args)
    except ValueError:
        return shlex.split(args)
    assert isinstance(value, list)
    return value


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def depends_conditions(service):
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def command_text(service):
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is None:
            continue
        parts.extend(value if isinstance(value, list) else [value])
    return " ".join(str(p) for p in parts)


def kafka_version_from_pom():
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(KAFKA_POM).getroot()
    props_el = root.find("m:properties", ns)
    props = (
        {}
        if props_el is None
        else {el.tag.split("}", 1)[-1]: (el.text or "").strip() for el in props_el}
    )
    for dep in root.iterfind("m:dependencies/m:dependency", ns):
        if dep.findtext("m:artifactId", namespaces=ns) == "kafka_2.13":
            version = dep.findtext("m:version", namespaces=ns).strip()
            return re.sub(r"\$\{([^}]+)\}", lambda m: props[m.group(1)], version)
    raise AssertionError("no kafka_2.13 dependency in infra/kafka/pom.xml")


# -- docker-compose.yml ---------------------------------------------------------------------


def test_compose_has_the_services(compose, services):
    assert "version" not in compose
    assert {"kafka", "mysql", "worker", "producer", "create-topics"} <= set(services)


def test_kafka_image_matches_local_kafka_version(services):
    version = kafka_version_from_pom()
    assert version == "3.9.1"
    for name in ("kafka", "create-topics"):
        repo, _, tag = services[name]["image"].partition(":")
        assert repo == "apache/kafka", name
        assert tag.startswith("3.") and tag == version, name


def test_kafka_is_single_node_kraft(services):
    kafka = services["kafka"]
    env = env_of(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert "kafka-broker-api-versions.sh" in json.dumps(kafka["healthcheck"]["test"])


def test_mysql_service(services):
    mysql = services["mysql"]
    assert mysql["image"] == "mysql:8.0"
    env = env_of(mysql)
    assert env["MYSQL_DATABASE"] == "coupons"
    assert (env["MYSQL_USER"], env["MYSQL_PASSWORD"]) == ("coupons", "coupons")
    assert env["MYSQL_ROOT_PASSWORD"]
    assert "mysqladmin ping" in json.dumps(mysql["healthcheck"]["test"])


def test_published_ports_bind_to_localhost_only(services):
    for name, service in services.items():
        for port in service.get("ports") or []:
            spec = port if isinstance(port, str) else port.get("host_ip", "")
            assert str(spec).startswith("127.0.0.1"), (name, port)


def test_worker_builds_from_repo_root(services):
    worker = services["worker"]
    build = worker["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert context == "."
    assert (ROOT / context / dockerfile).is_file()


def test_worker_replicas_share_one_group(services):
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert "ports" not in worker, "replicas can't share a fixed host port"
    assert "container_name" not in worker
    env = env_of(worker)
    assert env["COUPON_APP_ID"]
    assert "/health/ready" in json.dumps(worker["healthcheck"]["test"])


def test_every_coupon_env_name_is_a_settings_field():
    used = set(COUPON_NAME.findall(COMPOSE.read_text()))
    assert used, "compose sets no COUPON_* variables"
    unknown = used - SETTINGS_ENV
    assert not unknown, f"not fields of Settings: {sorted(unknown)}"


@pytest.mark.parametrize("name", ["worker", "producer"])
def test_service_points_at_kafka_and_mysql(services, name):
    env = env_of(services[name])
    assert urlsplit(env["COUPON_BROKER"]).netloc == "kafka:9092"
    db = urlsplit(env["COUPON_DB_URL"])
    assert db.scheme == "mysql+asyncmy"
    assert db.hostname == "mysql"
    assert db.port in (None, 3306)
    assert db.path == "/" + env_of(services["mysql"])["MYSQL_DATABASE"]
    # Loadable with this environment (validators included).
    settings = Settings(**{k[len("COUPON_") :].lower(): v for k, v in env.items()})
    assert settings.bootstrap_servers == "kafka:9092"


def test_worker_and_producer_share_the_environment(services):
    assert env_of(services["worker"]) == env_of(services["producer"])


def test_depends_on_conditions(services):
    assert depends_conditions(services["worker"]) == {
        "kafka": "service_healthy",
        "mysql": "service_healthy",
        "create-topics": "service_completed_successfully",
    }
    producer = depends_conditions(services["producer"])
    assert producer["kafka"] == "service_healthy"
    assert producer["create-topics"] == "service_completed_successfully"
    assert depends_conditions(services["create-topics"])["kafka"] == "service_healthy"


def test_create_topics_creates_the_input_topics(services):
    text = command_text(services["create-topics"])
    assert "/opt/kafka/bin/kafka-topics.sh" in text
    assert "--create" in text and "--if-not-exists" in text
    assert "kafka:9092" in text
    env = env_of(services["worker"])
    defaults = Settings.model_fields
    for key in ("orders_topic", "refunds_topic"):
        topic = env.get(f"COUPON_{key.upper()}", defaults[key].default)
        assert re.search(rf"(?<![\w.-]){re.escape(topic)}(?![\w.-])", text), topic
    partitions = env.get("COUPON_PARTITIONS", defaults["partitions"].default)
    assert re.search(rf"--partitions[ =]{partitions}\b", text)
    assert services["create-topics"].get("restart", "no") == "no"


def test_producer_is_one_shot(services):
    producer = services["producer"]
    assert producer["restart"] == "no"
    assert producer["entrypoint"] == ["sh", "-c"]
    text = command_text(producer)
    assert "coupon-stream generate --orders 20000 --out /tmp/demo" in text
    assert (
        "coupon-stream produce --orders /tmp/demo/orders.jsonl --refunds /tmp/demo/refunds.jsonl"
        in text
    )


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_base_image(dockerfile):
    bases = [args.split()[0] for args in args_of(dockerfile, "FROM")]
    assert bases and all(base == "python:3.11-slim" for base in bases), bases


def test_dockerfile_runs_as_non_root(dockerfile):
    users = args_of(dockerfile, "USER")
    assert users, "no USER"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_entrypoint_and_port(dockerfile):
    (health,) = args_of(dockerfile, "HEALTHCHECK")
    assert "/health/ready" in health
    assert "urllib.request" in health
    (entrypoint,) = args_of(dockerfile, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["coupon-stream"]
    assert exec_form(args_of(dockerfile, "CMD")[-1])[0] == "worker"
    exposed = " ".join(args_of(dockerfile, "EXPOSE")).split()
    assert str(Settings.model_fields["web_port"].default) in exposed


def test_dockerfile_env_and_volume(dockerfile):
    env = {}
    for args in args_of(dockerfile, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    unknown = {k for k in env if k.startswith("COUPON_")} - SETTINGS_ENV
    assert not unknown, unknown
    data_dir = env["COUPON_DATA_DIR"]
    assert data_dir == "/var/lib/coupon-stream"
    volumes = [v for args in args_of(dockerfile, "VOLUME") for v in exec_form(args)]
    assert data_dir in volumes
    assert any(data_dir in args for args in args_of(dockerfile, "RUN")), "data dir not created"


def copied_sources(dockerfile):
    sources = []
    for args in args_of(dockerfile, "COPY"):
        words = exec_form(args) if args.startswith("[") else shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        sources.extend([w for w in words if not w.startswith("--")][:-1])
    return sources


def test_dockerfile_copies_existing_paths(dockerfile):
    sources = copied_sources(dockerfile)
    assert {"pyproject.toml", "README.md"} <= set(sources)
    assert any(s.rstrip("/") == "coupon_stream" for s in sources)
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"COPY sources missing from the repo: {missing}"
    assert any("pip install --no-cache-dir ." in args for args in args_of(dockerfile, "RUN"))


def test_dockerignore_keeps_what_the_build_copies(dockerfile):
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for expected in (".venv", ".local", ".git", "tests", "*.db"):
        assert expected in patterns, expected
    for source in copied_sources(dockerfile):
        source = source.rstrip("/")
        for pattern in patterns:
            if pattern.startswith("!"):
                continue
            bare = pattern.removeprefix("**/").rstrip("/")
            assert not (fnmatch.fnmatch(source, pattern) or fnmatch.fnmatch(source, bare)), (
                f".dockerignore pattern {pattern!r} excludes COPY source {source!r}"
            )
