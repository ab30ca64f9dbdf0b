"""infra/: genloop beyond one machine (Docker Compose, Kubernetes), checked without a Docker engine
or a cluster.

- the compose file's structure (services, health checks, restart policies, volumes, wiring, no
  secret written in it), through `docker compose config` where the compose plugin is installed,
  else by parsing it and interpolating it as compose does;
- `.env.example` against the variables the compose file interpolates, and every variable given to
  a container against what reads it there (genloop, its scripts, Prefect, MLflow, botocore);
- the Kubernetes manifests (rendered by `kubectl kustomize` where kubectl is installed), the work
  pool's base job template (Prefect's own validator and templating), the torchrun training job
  and the Helm values of the official Prefect worker;
- the Dockerfiles' install steps against pyproject.toml and requirements.lock;
- integration: the worker image's command, infra/worker-entrypoint.sh, started here as a plain
  process against `genloop services up`, takes and completes a deployment run on its own pool,
  with the S3 endpoint, credentials and DVC remote given only as environment variables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.helpers import BIN, ROOT, TINY, cli_env, make_workspace, run_cli

INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE_FILE = INFRA / "docker-compose.yml"
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker", "worker-cpu", "dask-scheduler",
            "dask-worker"}
WORKERS = ("worker", "worker-cpu")
# credentials proper (an access key id, like a user name, identifies; it does not authenticate)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
# the variables by which genloop reaches its services on every target (point 3 of the issue):
# `genloop services up` exports the first three (src/genloop/orchestrate/local_services.py); S3 and DVC come from
# the shell there, from the compose file and from the Kubernetes ConfigMap/Secret elsewhere
ENDPOINT_VARS = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "GENLOOP_S3_ENDPOINT_URL",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "GENLOOP_DVC_REMOTE"}
# read by the entrypoints of the official images (their documentation), which are not installed here
IMAGE_VARS = {"postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"},
              "minio/minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}}


# ----------------------------------------------------------------------------- reading the files

def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _env_example() -> dict[str, str]:
    """infra/.env.example as compose reads a .env file: NAME=value lines, comments skipped."""
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def _test_env() -> dict[str, str]:
    """.env.example with every empty secret filled, as a user's infra/.env would be."""
    return {k: v or f"test-{k.lower().replace('_', '-')}-7d1c" for k, v in _env_example().items()}


_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${V}, $V, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}; $$ is a literal $."""
    def one(m: re.Match[str]) -> str:
        name = m.group("name") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        if op in (":?", "?") and (name not in env if op == "?" else not env.get(name)):
            raise ValueError(f"compose would stop: {name}: {arg}")
        if op == ":-":
            return env.get(name) or arg
        if op == "-":
            return env.get(name, arg)
        return env.get(name, "")

    return "$".join(_REF.sub(one, part) for part in text.split("$$"))


def _walk_strings(node: Any, fn: Any) -> Any:
    if isinstance(node, dict):
        return {k: _walk_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def _compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def _compose(tmp_path: Path) -> dict[str, Any]:
    """The compose model with both worker profiles, interpolated with _test_env()."""
    if _docker_compose_available():
        env_file = tmp_path / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in _test_env().items()))
        done = subprocess.run(
            ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE_FILE),
             "--profile", "gpu", "--profile", "cpu", "config", "--format", "json"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    env = _test_env()
    return _walk_strings(_compose_raw(), lambda s: _interpolate(s, env))


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _compose(tmp_path_factory.mktemp("compose"))


def _interpolated_names(node: Any) -> set[str]:
    names: set[str] = set()

    def collect(s: str) -> str:
        for part in s.split("$$"):
            names.update(m.group("name") or m.group("plain") for m in _REF.finditer(part))
        return s

    _walk_strings(node, collect)
    return names


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes, short ("src:dst[:ro]") or long syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        out[target] = source
    return out


def _published(service: dict[str, Any]) -> set[int]:
    """The container ports a service publishes or exposes."""
    ports = set()
    for p in service.get("ports", []):
        ports.add(int(p.split(":")[-1]) if isinstance(p, str) else int(p["target"]))
    ports.update(int(str(p).split("/")[0]) for p in service.get("expose", []))
    return ports


def _command_port(service: dict[str, Any]) -> set[int]:
    cmd = service.get("command") or []
    return {int(cmd[i + 1]) for i, a in enumerate(cmd[:-1]) if a == "--port"}


def _k8s_docs() -> list[dict[str, Any]]:
    """The manifests of infra/k8s/kustomization.yaml, rendered by `kubectl kustomize` when kubectl
    is installed, else built here the same way (resources + namespace + ConfigMap generators)."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [d for d in yaml.safe_load_all(done.stdout) if d]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for r in kust["resources"] for d in yaml.safe_load_all((K8S / r).read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, path = f.rpartition("=")
            data[key or path] = (K8S / path).read_text()
        for lit in gen.get("literals", []):
            key, _, value = lit.partition("=")
            data[key] = value
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = kust["namespace"]
    return docs


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _job_template() -> dict[str, Any]:
    return json.loads((K8S / "base-job-template.json").read_text())


def _train_job() -> dict[str, Any]:
    return yaml.safe_load((K8S / "train-ddp-job.yaml").read_text())


def _pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod spec of infra/k8s: workloads, the work pool's flow-run job, the training job."""
    specs = {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
             for d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    specs["work-pool flow run"] = _job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    specs["Job/genloop-train-ddp"] = _train_job()["spec"]["template"]["spec"]
    return specs


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _container_env_names(container: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> set[str]:
    """The variables a container gets from its env list and its envFrom ConfigMaps."""
    env = container.get("env", [])
    names = {e["name"] for e in env} if isinstance(env, list) else set()
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            names |= set(configmaps[src["configMapRef"]["name"]]["data"])
    return names


def _prefect_deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for f in (ROOT / "flows" / "prefect.yaml", K8S / "prefect.yaml")
            for d in yaml.safe_load(f.read_text())["deployments"]}


def _dockerfile(name: str = "Dockerfile") -> list[str]:
    """The Dockerfile's instructions, one string each (continuation lines joined, comments dropped)."""
    lines, current = [], ""
    for raw in (INFRA / name).read_text().splitlines():
        if raw.strip().startswith("#"):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(" ".join(current.split()))
            current = ""
    return lines


# ------------------------------------------------------------------------ who reads a variable

def _genloop_vars() -> set[str]:
    """Upper-case string literals of genloop's source that name environment variables
    (os.environ.get("X"), S3_ENDPOINT_VARS, OFFLINE_DEFAULTS, ...)."""
    names = set()
    for path in (ROOT / "src" / "genloop").rglob("*.py"):
        names |= set(re.findall(r"[\"']([A-Z][A-Z0-9]*_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def _script_vars() -> set[str]:
    """Variables the infra scripts (worker entrypoint, workspace-init, bucket creation) read."""
    names = set()
    for path in [*INFRA.glob("*.sh"), *INFRA.glob("*/*.sh")]:
        names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", path.read_text()))
    return names


def _prefect_vars() -> set[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    return set(_get_settings_fields(Settings))


def _library_source_vars() -> set[str]:
    """Variables named in the modules of MLflow and botocore that read them."""
    import botocore.configprovider
    import botocore.credentials
    import mlflow.environment_variables
    import mlflow.utils.cli_args

    text = ""
    for mod in (botocore.credentials, botocore.configprovider, mlflow.environment_variables, mlflow.utils.cli_args):
        text += Path(mod.__file__).read_text()
    text += (Path(mlflow.environment_variables.__file__).parent / "cli" / "__init__.py").read_text()
    return set(re.findall(r"[\"']([A-Z][A-Z0-9]*_[A-Z0-9_]+)[\"']", text))


@pytest.fixture(scope="module")
def readers() -> dict[str, set[str]]:
    return {"genloop": _genloop_vars(), "infra scripts": _script_vars(), "prefect": _prefect_vars(),
            "mlflow/botocore": _library_source_vars()}


# ================================================================================ compose

def test_compose_brings_up_every_service_with_a_health_check_and_a_restart_policy(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        check = svc.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name}: no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"
    # the one-shot bucket job restarts only on failure, and what needs the buckets waits for it
    assert services["minio-init"]["restart"] == "on-failure"
    for name in ("mlflow", *WORKERS):
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("mlflow", "prefect-server"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in WORKERS:
        for dep in ("prefect-server", "mlflow"):
            assert services[name]["depends_on"][dep]["condition"] == "service_healthy"


def test_compose_keeps_every_state_in_a_named_volume(compose):
    services, volumes = compose["services"], set(compose["volumes"])
    expected = {"postgres": ("/var/lib/postgresql/data", "postgres-data"), "minio": ("/data", "minio-data"),
                "worker": ("/workspace", "workspace"), "worker-cpu": ("/workspace", "workspace")}
    for name, (target, volume) in expected.items():
        assert _mounts(services[name]).get(target) == volume, f"{name}: {target} is not on volume {volume}"
        assert volume in volumes
    # the first start of PostgreSQL creates the Prefect database beside MLflow's (POSTGRES_DB)
    init = [s for t, s in _mounts(services["postgres"]).items() if t.startswith("/docker-entrypoint-initdb.d/")]
    assert len(init) == 1 and "CREATE DATABASE prefect" in (INFRA / "postgres" / Path(init[0]).name).read_text()
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"


def test_compose_mlflow_server_uses_postgres_and_proxies_artifacts_in_minio(compose):
    mlflow = compose["services"]["mlflow"]
    env = _test_env()
    assert "--serve-artifacts" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/mlflow")
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{env['GENLOOP_MLFLOW_BUCKET']}"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # the buckets the server and the DVC remote use are the ones minio-init creates
    init_env = compose["services"]["minio-init"]["environment"]
    script = (INFRA / "minio" / "create-buckets.sh").read_text()
    assert "$GENLOOP_MLFLOW_BUCKET" in script and "$GENLOOP_DATA_BUCKET" in script and "mc mb" in script
    assert init_env["GENLOOP_MLFLOW_BUCKET"] == env["GENLOOP_MLFLOW_BUCKET"]
    for worker in WORKERS:
        remote = compose["services"][worker]["environment"]["GENLOOP_DVC_REMOTE"]
        assert remote == f"s3://{init_env['GENLOOP_DATA_BUCKET']}/dvc"
    # the server must accept the Host header the workers send (http://mlflow:5000)
    assert "mlflow:5000" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_compose_prefect_server_uses_postgres(compose):
    prefect = compose["services"]["prefect-server"]
    env = _test_env()
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/prefect")
    assert prefect["command"][:3] == ["prefect", "server", "start"]


def test_compose_worker_is_the_genloop_image_with_gpus_reserved(compose):
    gpu, cpu = compose["services"]["worker"], compose["services"]["worker-cpu"]
    version = _pyproject()["project"]["version"]
    for svc in (gpu, cpu):
        assert svc["build"]["dockerfile"] == "infra/Dockerfile"
        context = Path(svc["build"]["context"])  # compose config writes it absolute
        assert (context if context.is_absolute() else INFRA / context).resolve() == ROOT
        assert svc["image"] == f"genloop:{version}"
        assert "command" not in svc  # the image's CMD: infra/worker-entrypoint.sh
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": devices[0]["count"], "capabilities": ["gpu"]}]
    assert devices[0]["count"] in ("all", -1)  # compose config writes "all" as -1
    assert "deploy" not in cpu
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    # the health check asks the worker's own health server (prefect worker start --with-healthcheck)
    assert "--with-healthcheck" in (INFRA / "worker-entrypoint.sh").read_text()
    assert "127.0.0.1:8080/health" in " ".join(gpu["healthcheck"]["test"])


def test_compose_urls_name_services_of_the_file_and_their_ports(compose):
    services = compose["services"]
    urls = [(name, var, value) for name, svc in services.items()
            for var, value in svc.get("environment", {}).items()
            if isinstance(value, str) and re.match(r"^[a-z0-9+]+://", value)]
    checked = []
    for name, var, value in urls:
        m = re.match(r"^[a-z0-9+]+://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", value)
        host, port = m.group(1), m.group(2)
        if value.startswith("s3://") or host == "localhost":
            continue  # a bucket, or the browser's view of a published port
        assert host in services, f"{name}.{var}={value}: no service {host!r}"
        listens = _published(services[host]) | _command_port(services[host])
        assert port and int(port) in listens, f"{name}.{var}={value}: {host} listens on {listens}"
        checked.append((name, var))
    # every URL between services: the databases, the object store, and each worker's three servers
    workers = [(w, var) for w in WORKERS for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                       "GENLOOP_S3_ENDPOINT_URL")]
    assert sorted(checked) == sorted([("mlflow", "MLFLOW_BACKEND_STORE_URI"), ("mlflow", "MLFLOW_S3_ENDPOINT_URL"),
                                      ("prefect-server", "PREFECT_API_DATABASE_CONNECTION_URL"), *workers])


def test_no_secret_is_written_in_the_compose_file():
    raw = _compose_raw()
    secrets = {k for k in _env_example() if SECRET_NAME.search(k)}
    assert secrets >= {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"}
    for name, svc in raw["services"].items():
        for var, value in (svc.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(var):
                # the whole value is one reference to infra/.env, which compose requires to be set
                assert re.fullmatch(rf"\$\{{{re.escape(var)}:\?[^}}]+\}}", value), f"{name}.{var}={value}"
            for userinfo in re.findall(r"://([^@/\s]+)@", value):
                password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
                assert password.startswith("${"), f"{name}.{var}: a password written in a URL"
    text = COMPOSE_FILE.read_text()
    for var, value in _env_example().items():
        if SECRET_NAME.search(var):
            assert value == "", f".env.example ships a value for the secret {var}"
    for value in (_test_env()[v] for v in secrets):
        assert value not in text


def test_env_example_lists_exactly_the_variables_the_compose_file_reads(compose):
    documented = set(_env_example())
    interpolated = _interpolated_names(_compose_raw())
    # COMPOSE_PROFILES is read by docker compose itself: the worker profile to start
    assert documented - {"COMPOSE_PROFILES"} == interpolated
    profiles = {p for svc in compose["services"].values() for p in svc.get("profiles", [])}
    assert set(_env_example()["COMPOSE_PROFILES"].split(",")) <= profiles


def test_every_variable_given_to_a_container_is_read_there(compose, readers):
    for name, svc in compose["services"].items():
        image = svc.get("image", "").split(":")[0]
        for var in svc.get("environment", {}):
            who = [r for r, names in readers.items() if var in names]
            if var in IMAGE_VARS.get(image, set()):
                who.append(f"the {image} image")
            assert who, f"{name}: nothing reads {var}"


def test_local_compose_and_kubernetes_give_genloop_the_same_variables(compose, readers):
    from genloop.orchestrate.local_services import Ports, service_env

    assert set(service_env(Ports())) <= ENDPOINT_VARS  # what `genloop services up` exports locally
    for var in ENDPOINT_VARS:  # each is read by genloop, its scripts, Prefect or boto3
        assert any(var in names for names in readers.values()), var
    for worker in WORKERS:
        assert ENDPOINT_VARS <= set(compose["services"][worker]["environment"]), worker
    configmaps = _by_kind(_k8s_docs(), "ConfigMap")
    for what in ("work-pool flow run", "Job/genloop-train-ddp"):
        main = _pod_specs()[what]["containers"][0]
        assert ENDPOINT_VARS <= _container_env_names(main, configmaps), what


# ================================================================================ images

def test_dockerfile_installs_the_lock_then_genloop_without_deps_as_make_install_does():
    steps = _dockerfile()
    runs = [s for s in steps if s.startswith("RUN ")]
    lock = next(i for i, s in enumerate(runs) if " -r requirements.lock" in s)
    package = next(i for i, s in enumerate(runs) if "--no-deps ." in s)
    assert lock < package
    assert "uv pip install" in runs[lock] and "uv pip install" in runs[package]
    makefile = (ROOT / "Makefile").read_text()
    assert "uv pip install" in makefile and "-r requirements.lock" in makefile and "--no-deps -e ." in makefile
    # the files the package build needs are in the image before the --no-deps install
    copied = " ".join(s for s in steps[: steps.index(runs[package])] if s.startswith("COPY "))
    for needed in ("requirements.lock", "pyproject.toml", _pyproject()["project"]["readme"], "src"):
        assert needed in copied, needed
    # the entry points it checks at build time and runs: pyproject's genloop script, prefect, torchrun
    scripts = _pyproject()["project"]["scripts"]
    assert scripts == {"genloop": "genloop.cli.main:app"}
    assert any(s.startswith("RUN genloop --help") for s in steps)
    assert any("torchrun --help" in s for s in steps)
    assert steps[-1] == 'CMD ["worker-entrypoint.sh"]'
    assert "COPY infra/worker-entrypoint.sh infra/workspace-init.sh /usr/local/bin/" in steps


def test_dockerfile_python_and_torch_agree_with_pyproject_and_the_lock():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    steps = _dockerfile()
    python = next(s.split("=", 1)[1] for s in steps if s.startswith("ARG PYTHON_VERSION="))
    assert Version(python) in SpecifierSet(_pyproject()["project"]["requires-python"])
    lock_header = (ROOT / "requirements.lock").read_text().splitlines()[1]
    assert f"--python-version {python}" in lock_header  # the lock was resolved for this Python
    # torch: the lock's version, as the CUDA build (the lock pins the CPU build, +cpu)
    install = next(s for s in steps if " -r requirements.lock" in s)
    override = re.search(r"--override (\S+)", install).group(1)
    assert override == "infra/requirements-torch-cuda.txt"
    pins = [ln for ln in (INFRA / "requirements-torch-cuda.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert pins == [f"torch=={Version(_lock_pins()['torch']).public}"]
    assert "+" not in pins[0]
    base = next(s for s in steps if s.startswith("FROM nvidia/cuda:"))
    assert re.match(r"FROM nvidia/cuda:13\.0\.\d+-base-ubuntu", base)  # PyPI's torch 2.13 is built for CUDA 13.0


def test_docker_build_contexts_hold_what_the_dockerfiles_copy():
    import fnmatch

    def included(path: str, patterns: list[str]) -> bool:
        keep = True
        for p in patterns:
            negated = p.startswith("!")
            p = p.lstrip("!")
            if fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/"):
                keep = negated
        return keep

    for dockerfile in ("Dockerfile", "mlflow.Dockerfile"):
        ignore = [ln.strip() for ln in (INFRA / f"{dockerfile}.dockerignore").read_text().splitlines()
                  if ln.strip() and not ln.startswith("#")]
        copies = [s for s in _dockerfile(dockerfile) if s.startswith("COPY ") and "--from=" not in s]
        assert copies, dockerfile
        for step in copies:
            for source in step.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile}: {source} not in the repository"
                assert included(source, ignore), f"{dockerfile}: {source} left out of the build context"
        assert not included(".venv", ignore) and not included(".git", ignore)


def test_service_images_run_the_versions_genloop_is_locked_to(compose):
    pins = _lock_pins()
    prefect_tag = f"prefecthq/prefect:{pins['prefect']}-python3.11"
    assert compose["services"]["prefect-server"]["image"] == prefect_tag
    assert _by_kind(_k8s_docs(), "Deployment")["prefect-server"]["spec"]["template"]["spec"]["containers"][0][
        "image"] == prefect_tag
    helm = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())
    assert helm["worker"]["image"]["prefectTag"] == f"{pins['prefect']}-python3.11-kubernetes"
    # the MLflow server image installs MLflow and boto3 constrained by the lock
    mlflow_steps = _dockerfile("mlflow.Dockerfile")
    install = next(s for s in mlflow_steps if "pip install" in s)
    assert "-c /tmp/requirements.lock" in install and " mlflow " in install and " boto3 " in install
    assert "psycopg2" in install
    assert mlflow_steps[0].startswith("FROM python:3.11")
    for svc in compose["services"].values():  # every image pinned, none floating
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), svc["image"]


# ================================================================================ Kubernetes

def test_kubernetes_manifests_are_complete_and_probed():
    docs = _k8s_docs()
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"genloop"}
    services = _by_kind(docs, "Service")
    assert {"postgres", "minio", "mlflow", "prefect-server"} <= set(services)
    assert "Secret" not in {d["kind"] for d in docs}  # made from infra/.env, never committed
    version = _pyproject()["project"]["version"]
    for kind in ("Deployment", "StatefulSet"):
        for name, d in _by_kind(docs, kind).items():
            container = d["spec"]["template"]["spec"]["containers"][0]
            assert container.get("readinessProbe") and container.get("livenessProbe"), f"{kind}/{name}"
            assert container.get("resources", {}).get("requests"), f"{kind}/{name}"
            assert services[name]["spec"]["selector"] == d["spec"]["selector"]["matchLabels"], name
    for what, spec in _pod_specs().items():
        for c in _containers(spec):
            image = c["image"]
            if image == "{{ image }}":
                continue  # the work pool's image variable (its default is checked with the template)
            assert ":" in image and not image.endswith(":latest"), f"{what}: {image}"
            if image.split(":")[0] in ("genloop", "genloop-mlflow"):
                assert image.split(":")[1] == version, f"{what}: {image}"
    pvc = _by_kind(docs, "PersistentVolumeClaim")
    assert set(pvc) == {"genloop-workspace"}


def test_mlflow_deployment_reads_postgres_and_s3_settings_from_the_secret_and_config():
    spec = _by_kind(_k8s_docs(), "Deployment")["mlflow"]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert "--serve-artifacts" in c["command"]
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == \
        "postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@$(POSTGRES_HOST):5432/mlflow"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == "s3://$(GENLOOP_MLFLOW_BUCKET)"
    for var in ("POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "genloop-secrets", "key": var}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["key"] == "GENLOOP_S3_ENDPOINT_URL"
    # Kubernetes expands $(VAR) only from variables defined before it in the same list
    order = [e["name"] for e in c["env"]]
    for var, e in env.items():
        for ref in re.findall(r"\$\(([A-Z_]+)\)", e.get("value", "")):
            assert order.index(ref) < order.index(var), f"{var} uses $({ref}) before it is defined"
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")


def test_every_secret_in_the_manifests_comes_from_the_genloop_secret(readers):
    documented = set(_env_example())
    configmaps = _by_kind(_k8s_docs(), "ConfigMap")
    for what, spec in _pod_specs().items():
        for c in _containers(spec):
            env = c.get("env", [])
            env = env if isinstance(env, list) else []
            for e in env:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if SECRET_NAME.search(e["name"]):
                    assert ref and "value" not in e, f"{what}: {e['name']} is not from a Secret"
                if ref:
                    assert ref["name"] == "genloop-secrets", what
                    assert ref["key"] in documented, f"{what}: key {ref['key']} not in .env.example"
                # what each variable is for: read by genloop/Prefect/MLflow/boto3/scripts/the image,
                # or expanded by Kubernetes into another variable of the same container
                used = any(e["name"] in names for names in readers.values()) \
                    or e["name"] in set().union(*IMAGE_VARS.values()) \
                    or any(f"$({e['name']})" in str(x.get("value", "")) for x in env)
                assert used, f"{what}: nothing reads {e['name']}"
            for src in c.get("envFrom", []):
                assert "secretRef" not in src, f"{what}: all of a Secret's keys injected"
                assert src["configMapRef"]["name"] in configmaps, what
    for key in configmaps["genloop-config"]["data"]:
        used = any(key in names for names in readers.values()) or any(
            f"'key': '{key}'" in str(spec) or f"$({key})" in str(spec) for spec in _pod_specs().values())
        assert used, f"genloop-config: nothing reads {key}"


def test_work_pool_template_requests_gpus_and_mounts_the_workspace():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = _job_template()
    validate_base_job_template(template)  # what the Prefect server checks on `work-pool create`
    props = template["variables"]["properties"]
    assert props["gpus"]["type"] == "integer" and props["gpus"]["default"] >= 1
    assert props["image"]["default"] == f"genloop:{_pyproject()['project']['version']}"
    assert props["namespace"]["default"] == "genloop"
    # rendered as the worker renders it for a deployment that sets no job variables
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    job = apply_values(template["job_configuration"], defaults)["job_manifest"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "genloop"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    main = pod["containers"][0]
    assert main["name"] == "prefect-job"  # the container prefect-kubernetes fills in (env, command)
    assert main["image"] == defaults["image"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == defaults["gpus"]
    assert apply_values(template["job_configuration"], {**defaults, "gpus": 4})["job_manifest"]["spec"][
        "template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"] == "genloop-workspace"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    init = pod["initContainers"][0]
    assert init["command"] == ["workspace-init.sh", "/workspace"] and init["image"] == main["image"]


def test_training_job_runs_torchrun_over_every_gpu_it_requests():
    import typer

    from genloop.cli.main import app

    spec = _train_job()["spec"]["template"]["spec"]
    c = spec["containers"][0]
    cmd = c["command"]
    assert cmd[0] == "torchrun" and "--standalone" in cmd
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 2
    nproc = next(a.split("=", 1)[1] for a in cmd if a.startswith("--nproc_per_node="))
    assert nproc in ("gpu", str(gpus))  # "gpu": one process per GPU the pod was given
    # the module and options torchrun starts are genloop's train command as the CLI defines it
    module = cmd.index("-m")
    assert cmd[module + 1: module + 3] == ["genloop.cli.main", "train"]
    options = {o for p in typer.main.get_command(app).commands["train"].params for o in p.opts}
    given = [a for a in cmd[module + 3:] if a.startswith("--")]
    assert given and set(given) <= options
    assert c["workingDir"] == "/workspace"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"] == "genloop-workspace"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_helm_worker_serves_the_pool_of_the_k8s_deployment_with_the_base_job_template():
    values = yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())["worker"]
    k8s = _prefect_deployments()["k8s-gpu"]
    assert values["config"]["workPool"] == k8s["work_pool"]["name"] == "genloop-k8s"
    assert values["config"]["type"] == "kubernetes"
    assert values["apiConfig"] == "selfHostedServer"
    host = re.match(r"http://([^.:/]+)[^:/]*:(\d+)/api$", values["selfHostedServerApiConfig"]["apiUrl"])
    service = _by_kind(_k8s_docs(), "Service")[host.group(1)]
    assert int(host.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    # the chart reads the template from this ConfigMap's key baseJobTemplate.json
    configmap = _by_kind(_k8s_docs(), "ConfigMap")[values["config"]["baseJobTemplate"]["existingConfigMapName"]]
    assert json.loads(configmap["data"]["baseJobTemplate.json"]) == _job_template()


def test_k8s_deployment_runs_the_nightly_flow_on_the_gpu_pool():
    deployments = _prefect_deployments()
    nightly, k8s = deployments["nightly"], deployments["k8s-gpu"]
    assert k8s["entrypoint"] == nightly["entrypoint"]
    assert k8s["parameters"] == nightly["parameters"]  # the same params.yaml and flow
    assert set(k8s["work_pool"]["job_variables"]) <= set(_job_template()["variables"]["properties"])
    assert k8s["work_pool"]["job_variables"]["gpus"] >= 1
    pull = k8s["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/workspace"}}]
    # the existing deployments stay on the local process pool, in the folder they were deployed from
    for name in ("nightly", "hourly"):
        pool = deployments[name]["work_pool"]
        assert pool["name"] == "genloop-local" and "pull" not in deployments[name]
        # only environment: overlapping scheduled runs wait for the workspace lock; stage logs reach Prefect
        assert set(pool.get("job_variables", {})) <= {"env"}
        assert int(pool["job_variables"]["env"]["GENLOOP_LOCK_WAIT_SECONDS"]) > 0


def test_workspace_init_seeds_a_workspace_once_and_sets_the_dvc_remote_locally(tmp_path):
    from genloop.mlops.dvc_remote import default_remote

    ws = tmp_path / "workspace"
    env = cli_env(tmp_path, GENLOOP_SOURCE=str(ROOT), GENLOOP_DVC_REMOTE="s3://genloop-data/dvc")
    run_cli([str(INFRA / "workspace-init.sh"), str(ws)], tmp_path, env, timeout=120)
    assert (ws / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
    assert (ws / "flows" / "loop.py").exists() and (ws / "src" / "genloop" / "cli" / "main.py").exists()
    assert not list(ws.rglob("__pycache__")) and not list(ws.rglob("*.egg-info"))
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True).returncode == 0
    remote = default_remote(ws)
    assert (remote.name, remote.url) == ("genloop", "s3://genloop-data/dvc")
    assert "s3://" not in (ws / ".dvc" / "config").read_text()  # local to this machine only
    # a second run keeps the team's params and history, and follows a changed remote
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text() + "# edited\n")
    env["GENLOOP_DVC_REMOTE"] = "s3://other-bucket/dvc"
    run_cli([str(INFRA / "workspace-init.sh"), str(ws)], tmp_path, env, timeout=120)
    assert (ws / "params.yaml").read_text().endswith("# edited\n")
    assert default_remote(ws).url == "s3://other-bucket/dvc"


# ================================================================================ integration

POOL = "genloop-compose"
WORKER_NAME = "genloop-entrypoint-test"
DATA_BUCKET = "genloop-data"


@pytest.fixture(scope="module")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`genloop services up` in a tiny workspace (MLflow server, Prefect server, a process worker
    on genloop-local); `genloop services down` at the end."""
    ws = make_workspace(tmp_path_factory.mktemp("infra"))
    cmd = [str(BIN / "genloop"), "services", "up", "--mlflow-port", str(free_port()),
           "--prefect-port", str(free_port())]
    run_cli(cmd, ws, cli_env(ws), timeout=400)
    try:
        yield ws, json.loads((ws / ".genloop" / "services" / "services.json").read_text())
    finally:
        subprocess.run([str(BIN / "genloop"), "services", "down"], cwd=ws, env=cli_env(ws),
                       capture_output=True, timeout=120)


def _api(state: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    reply = httpx.request(method, state["urls"]["prefect_api"] + path, json=body, timeout=30, trust_env=False)
    reply.raise_for_status()
    return reply.json()


@pytest.fixture(scope="module")
def entrypoint_worker(local_services: Any, moto_server: str) -> Any:
    """infra/worker-entrypoint.sh as a plain process on its own pool, configured only through the
    environment, as the compose file configures the container: the services' URLs, an S3
    endpoint (moto) with credentials, and the DVC remote. Stopped (its process group) at the end."""
    import boto3

    ws, state = local_services
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=DATA_BUCKET)
    health_port = free_port()
    env = cli_env(ws, **state["env"], GENLOOP_WORK_POOL=POOL, GENLOOP_WORKSPACE=str(ws),
                  GENLOOP_WORKER_NAME=WORKER_NAME, GENLOOP_S3_ENDPOINT_URL=moto_server,
                  AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  GENLOOP_DVC_REMOTE=f"s3://{DATA_BUCKET}/dvc",
                  PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1", PREFECT_WORKER_WEBSERVER_PORT=str(health_port))
    log = ws / "entrypoint-worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(INFRA / "worker-entrypoint.sh")], cwd=ws, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the entrypoint exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                healthy = httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=2,
                                    trust_env=False).status_code == 200
                workers = _api(state, "POST", f"/work_pools/{POOL}/workers/filter", {})
                if healthy and any(w["name"] == WORKER_NAME and w["status"] == "ONLINE" for w in workers):
                    break
            except httpx.HTTPError:
                pass  # not listening, or the pool not created yet
            assert time.monotonic() < deadline, f"the entrypoint's worker never came online:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield {"env": env, "log": log, "health_port": health_port, "proc": proc}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_worker_entrypoint_as_a_plain_process_completes_a_deployment_run(local_services, entrypoint_worker,
                                                                         moto_server):
    import boto3

    ws, state = local_services
    pools = {p["name"]: p["type"] for p in _api(state, "POST", "/work_pools/filter", {})}
    assert pools[POOL] == "process"  # created by the worker the entrypoint started
    # flows/prefect.yaml's hourly (collect) deployment, as is but for its pool (and no schedule):
    # the full loop through a deployment is tests/integration/test_scheduled.py's; here the worker entry matters
    spec = yaml.safe_load((ROOT / "flows" / "prefect.yaml").read_text())
    hourly = _prefect_deployments()["hourly"]
    spec["deployments"] = [{**hourly, "name": "entrypoint", "work_pool": {"name": POOL}, "schedules": []}]
    (ws / "entrypoint-prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = cli_env(ws, **state["env"])
    run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "entrypoint-prefect.yaml"],
            ws, env, timeout=300)
    done = run_cli([str(BIN / "prefect"), "deployment", "run", "genloop-collect/entrypoint",
                    "--param", f"overrides={json.dumps(TINY)}", "--watch", "--watch-timeout", "600"],
                   ws, env, timeout=660)
    assert "Completed" in done.stdout, done.stdout[-3000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)
    run = _api(state, "GET", f"/flow_runs/{flow_run_id}")
    assert run["state"]["type"] == "COMPLETED" and run["work_pool_name"] == POOL
    # it ran under the entrypoint's worker, not the services' own worker on genloop-local
    assert flow_run_id in entrypoint_worker["log"].read_text()
    assert flow_run_id not in Path(state["processes"]["worker"]["log"]).read_text()
    assert (ws / "data.dvc").exists()  # collect ran in the workspace the entrypoint was given
    # ... and the data version went to the DVC remote named by GENLOOP_DVC_REMOTE at the S3
    # endpoint of GENLOOP_S3_ENDPOINT_URL (collect pushes when a default remote exists)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    pushed = s3.list_objects_v2(Bucket=DATA_BUCKET, Prefix="dvc/")
    assert pushed["KeyCount"] == 400 + 1 + 1  # TINY's 400 digits, the ledger and the .dir listing
    assert httpx.get(f"http://127.0.0.1:{entrypoint_worker['health_port']}/health",
                     trust_env=False).status_code == 200


def test_k8s_deployment_deploys_onto_a_pool_made_from_the_base_job_template(local_services):
    ws, state = local_services
    env = cli_env(ws, **state["env"])
    template = K8S / "base-job-template.json"
    run_cli([str(BIN / "prefect"), "--no-prompt", "work-pool", "create", "genloop-k8s", "--type", "kubernetes",
             "--base-job-template", str(template)], ws, env, timeout=120)
    pool = _api(state, "GET", "/work_pools/genloop-k8s")
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == json.loads(template.read_text())
    run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all",
             "--prefect-file", str(K8S / "prefect.yaml")], ws, env, timeout=300)
    deployment = _api(state, "GET", "/deployments/name/genloop-loop/k8s-gpu")
    assert deployment["work_pool_name"] == "genloop-k8s"
    assert deployment["job_variables"] == {"gpus": 1}
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/workspace"}}]
    assert deployment["parameters"]["params_file"] == "params.yaml"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
