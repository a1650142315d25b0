"""infra/ agrees with itself: the compose file, its `.env` example, the Dockerfile, the
Kubernetes manifests and the README. Static checks, no Docker needed."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from urllib.parse import urlsplit

import pytest
import yaml
from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
from prefect.server.schemas.actions import validate_base_job_template
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.utilities.templating import apply_values

from ops.environment import DEFAULTS
from support.compose import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    INFRA,
    interpolate,
    load_compose,
    load_env_file,
    strings,
    variables_used,
)

ROOT = INFRA.parent
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ROOT_USER")


@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def env_example():
    return load_env_file(ENV_EXAMPLE)


def filled(env_example: dict[str, str]) -> dict[str, str]:
    """The example with a distinct value for every empty entry, as a user's .env would be."""
    return {name: value or f"value-of-{name.lower()}" for name, value in env_example.items()}


def container_ports(service: dict) -> set[int]:
    """Ports a service listens on inside the compose network: its published targets and `expose`."""
    published = {int(str(entry).rsplit(":", 1)[-1]) for entry in service.get("ports", [])}
    return published | {int(port) for port in service.get("expose", [])}


# -- compose file and .env example ---------------------------------------------------------


def test_every_compose_variable_is_in_the_env_example_and_every_example_entry_is_used(compose, env_example):
    used = variables_used(compose)
    assert used - env_example.keys() == set(), "used by docker-compose.yml, missing from .env.example"
    assert env_example.keys() - used == set(), "in .env.example, used nowhere in docker-compose.yml"


def test_the_env_example_ships_no_secret_and_compose_refuses_to_start_without_one(compose, env_example):
    secrets = {name for name in env_example if SECRET_NAME.search(name)}
    assert secrets >= {"POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MINIO_ROOT_PASSWORD"}
    assert {name: env_example[name] for name in secrets if env_example[name]} == {}
    for name in sorted(secrets):
        without = {**filled(env_example), name: ""}
        with pytest.raises(ValueError, match=name):
            for text in strings(compose):
                interpolate(text, without)


def test_the_compose_file_has_no_literal_credentials(services):
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            value = str(value)
            if SECRET_NAME.search(key) or key.endswith(("ACCESS_KEY_ID", "SECRET_ACCESS_KEY")):
                assert re.fullmatch(r"\$\{[^}]+\}", value), f"{name}.{key} must come from the .env file"
            credentials = urlsplit(value).password if "://" in value else None
            if credentials is not None:
                assert re.fullmatch(r"\$\{[^}]+\}", credentials), (
                    f"{name}.{key}: password in the URL must come from .env"
                )


def test_published_ports_bind_the_configured_address_which_defaults_to_loopback(services, env_example):
    assert env_example["GPTFLOW_BIND_ADDRESS"] == "127.0.0.1"
    for name, service in services.items():
        for entry in service.get("ports", []):
            address, published, _target = re.fullmatch(r"(\$\{[^}]+\}):(\$\{[^}]+\}):(\d+)", str(entry)).groups()
            assert variables_used(address) == {"GPTFLOW_BIND_ADDRESS"}, f"{name} publishes {entry} on every interface"
            assert re.fullmatch(r"\$\{[A-Z_]+_PORT\b[^}]*\}", published), f"{name}: the host port comes from .env"
    assert "ports" not in services["postgres"], "PostgreSQL is for the compose network only"


def test_every_address_a_service_uses_names_a_service_listening_on_that_port(services, env_example):
    variables = filled(env_example)
    addresses = 0
    for name, service in services.items():
        for text in strings({"environment": service.get("environment", {}), "command": service.get("command", [])}):
            for host, port in re.findall(r"(?:://|@)([a-z][a-z0-9-]*):(\d+)", interpolate(text, variables)):
                addresses += 1
                assert host in services, f"{name} talks to {host}, which is not a service"
                assert int(port) in container_ports(services[host]), (
                    f"{name} talks to {host}:{port}; it listens on {container_ports(services[host])}"
                )
    assert addresses >= 6


def test_servers_listen_where_they_are_published_and_health_checked(services):
    prefect, mlflow = services["prefect-server"], services["mlflow"]
    assert container_ports(prefect) == {int(prefect["environment"]["PREFECT_SERVER_API_PORT"])}
    command = mlflow["command"]
    assert container_ports(mlflow) == {int(command[command.index("--port") + 1])}
    for name, service in services.items():
        for port in re.findall(r"127\.0\.0\.1:(\d+)/", " ".join(strings(service.get("healthcheck", {})))):
            expected = int(service["environment"].get("PREFECT_WORKER_WEBSERVER_PORT", 0)) or min(
                container_ports(service)
            )
            assert int(port) == expected, f"{name}'s healthcheck probes port {port}"


def test_long_running_services_have_healthchecks_and_dependencies_exist(services):
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency]
            else:
                assert condition["condition"] == "service_completed_successfully"
                assert services[dependency]["restart"] == "no"


def test_every_one_shot_service_is_awaited_by_a_long_running_one(services):
    """Else `docker compose up --wait` reports the one-shot's clean exit as a failure."""
    for name, service in services.items():
        if service.get("restart") == "no":
            awaiting = [
                other
                for other, spec in services.items()
                if spec.get("depends_on", {}).get(name, {}).get("condition") == "service_completed_successfully"
                and spec.get("restart") != "no"
            ]
            assert awaiting, f"nothing long-running waits for {name}"


def test_volumes_are_named_or_files_of_this_repository(compose, services):
    for name, service in services.items():
        for entry in service.get("volumes", []):
            source = entry.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_servers_get_postgres_s3_and_auth_as_the_issue_asks(services):
    prefect, mlflow, worker = (services[s]["environment"] for s in ("prefect-server", "mlflow", "worker"))
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # The worker authenticates with the credentials the servers are started with.
    for server_side, client_side in [
        (prefect["PREFECT_SERVER_API_AUTH_STRING"], worker["PREFECT_API_AUTH_STRING"]),
        (mlflow["MLFLOW_AUTH_ADMIN_USERNAME"], worker["MLFLOW_TRACKING_USERNAME"]),
        (mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"], worker["MLFLOW_TRACKING_PASSWORD"]),
    ]:
        assert len(variables_used(server_side)) == 1 and variables_used(server_side) == variables_used(client_side)
    serve_script = (INFRA / "mlflow" / "serve.sh").read_text()
    assert "--app-name basic-auth --serve-artifacts" in serve_script
    assert "$MLFLOW_AUTH_DATABASE_URI" in serve_script


def test_the_prefect_server_keeps_its_leases_in_files_on_a_volume(compose, services):
    """So that a restarted server still knows who holds each `gpu` slot (issue 28)."""
    environment = services["prefect-server"]["environment"]
    assert (
        environment["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == DEFAULTS["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"]
    )
    with temporary_settings({PREFECT_HOME: environment["PREFECT_HOME"]}):
        lease_folder = ConcurrencyLeaseStorage().storage_path  # where Prefect keeps them for that home
    mounts = dict(entry.split(":")[::-1] for entry in services["prefect-server"]["volumes"])
    assert mounts[str(lease_folder)] in compose["volumes"]


def test_the_databases_compose_connects_to_are_the_ones_the_init_script_creates(services, env_example):
    init_sql = (INFRA / "postgres" / "init-databases.sh").read_text()
    created = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", init_sql))
    variables = filled(env_example)
    for text in strings({s: services[s]["environment"] for s in ("prefect-server", "mlflow")}):
        url = urlsplit(interpolate(text, variables))
        if url.hostname == "postgres":
            assert created.get(url.path.lstrip("/")) == url.username, f"{url.path} is not created for {url.username}"


def test_the_image_the_services_run_is_built_from_infra_dockerfile(compose, services):
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)[1]
    assert ":" in base and not base.endswith(":latest"), "the base image is pinned by tag"
    assert 'ENTRYPOINT ["gptflow"]' in dockerfile
    assert re.search(r"^WORKDIR /opt/gptflow$", dockerfile, re.M)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert '["server"]' in dockerfile and {"psycopg2-binary", "boto3"} <= set(extras["server"])
    assert compose["x-gptflow-image"]["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    for name in ("prefect-server", "mlflow", "worker"):
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile"
    entrypoint = services["mlflow"]["entrypoint"][0]
    assert (ROOT / entrypoint.removeprefix("/opt/gptflow/")).is_file()


def test_the_image_and_make_install_the_hf_extra():
    """`gptflow export` works as installed: the Dockerfile's requirements (its own snippet, run
    here) and `make`'s install (run and test alike) include the `hf` extra."""
    snippet = re.search(r"<<'PY' > /tmp/requirements.txt\n(.*?)\nPY\n", (INFRA / "Dockerfile").read_text(), re.S)[1]
    listed = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, check=True)
    hf = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    assert {"transformers", "huggingface_hub"} <= set(hf) <= set(listed.stdout.split())
    assert re.search(r"pip install --quiet -e '\.\[hf,test\]'", (ROOT / "Makefile").read_text())


def test_the_gpu_override_targets_the_worker(services):
    override = yaml.safe_load((INFRA / "docker-compose.gpu.yml").read_text())
    assert set(override["services"]) <= set(services)
    devices = override["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_the_readme_names_real_services_ports_and_variables(services, env_example):
    readme = (INFRA / "README.md").read_text()
    named = re.findall(r"--scale (\S+)=", readme)
    named += re.findall(r"docker compose [^\n]*?\b(?:logs|restart|exec|run)\s+(?:--?[\w-]+\s+)*([a-z][\w-]*)", readme)
    named += [name for line in re.findall(r"\(or\s+(`[^)]*)\)", readme) for name in re.findall(r"`([\w-]+)`", line)]
    assert len(named) >= 8
    for service in named:
        assert service in services, f"README names service {service!r}"
    for port in re.findall(r"127\.0\.0\.1:(\d+)", readme):
        assert port in {env_example[name] for name in env_example if name.endswith("_PORT")}, f"README uses port {port}"
    settings = set(env_example) | {key for service in services.values() for key in service.get("environment", {})}
    for name in set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", readme)) - {"RUN_SPEC"}:
        assert name in settings, f"README refers to {name}, which neither .env.example nor a service defines"
    assert str(COMPOSE_FILE.relative_to(ROOT)) in readme


# -- Kubernetes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_template():
    return json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())


def render(template: dict, **values) -> dict:
    """The Job manifest the worker would submit: Prefect's own templating over the defaults."""
    properties = template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    return apply_values(template["job_configuration"], {**defaults, **values})["job_manifest"]


def test_the_work_pool_template_is_valid_for_prefect(job_template):
    assert validate_base_job_template(job_template) is job_template


def test_the_work_pool_template_requests_the_gpus_asked_for(job_template):
    assert job_template["variables"]["properties"]["gpus"]["default"] >= 1
    for gpus in (job_template["variables"]["properties"]["gpus"]["default"], 4):
        manifest = render(job_template, image="gptflow:test", gpus=gpus, command="prefect flow-run execute")
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert container["image"] == "gptflow:test"
        assert container["command"] + shlex.split(container["args"]) == [
            "/usr/bin/env",
            "prefect",
            "flow-run",
            "execute",
        ]
    assert manifest["kind"] == "Job"


@pytest.fixture(scope="module")
def multinode():
    documents = list(yaml.safe_load_all((INFRA / "k8s" / "train-multinode.yaml").read_text()))
    return {doc["kind"]: doc for doc in documents}


def torchrun_options(container: dict) -> tuple[dict[str, str], list[str]]:
    """torchrun's `--name=value` options, and what follows them (the program and its args)."""
    args = container["args"]
    module = args.index("-m")
    return dict(arg.removeprefix("--").split("=", 1) for arg in args[:module]), args[module + 1 :]


def test_the_multinode_job_rendezvous_at_pod_zero_of_its_headless_service(multinode):
    service, job = multinode["Service"], multinode["Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    options, program = torchrun_options(container)

    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed"

    host, port = options["rdzv_endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    assert options["rdzv_backend"] == "c10d"
    assert container["command"] == ["torchrun"]
    assert int(options["nnodes"]) == job["spec"]["completions"] == job["spec"]["parallelism"]


def test_the_multinode_job_gives_each_process_a_gpu_and_runs_the_training_module(multinode):
    container = multinode["Job"]["spec"]["template"]["spec"]["containers"][0]
    options, program = torchrun_options(container)
    assert int(options["nproc_per_node"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert program == ["model.train", "$(RUN_SPEC)"]
    assert importlib.util.find_spec(program[0]) is not None
    assert {e["name"] for e in container["env"]} == {"RUN_SPEC"}
