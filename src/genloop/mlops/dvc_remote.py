"""The DVC remote of a workspace: push the collected data version, pull it into a fresh clone.

DVC's S3 remote (dvc-s3 -> s3fs -> aiobotocore) reads AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL
by itself but knows nothing of GENLOOP_S3_ENDPOINT_URL. genloop resolves the endpoint the same
way for boto3 and DVC (GENLOOP_S3_ENDPOINT_URL, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL)
and hands it to the `dvc` subprocess as AWS_ENDPOINT_URL_S3, so nothing environment-specific
(and no credential) is ever written to .dvc/config or .dvc/config.local. An `endpointurl` set
in the DVC config for the remote is explicit and wins over the environment, as in botocore.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from genloop.core.errors import RemoteError, RemoteUnreachable
from genloop.core.storage import s3_endpoint_setting

log = logging.getLogger(__name__)

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")

# what a dvc push/pull prints when the remote did not answer or answered 5xx / throttling
_TRANSIENT = re.compile(
    r"could not connect|connect timeout|read timeout|timed out|connection (was )?(closed|reset|refused|aborted)"
    r"|connectionerror|endpointconnectionerror|serviceunavailable|service unavailable|internalerror"
    r"|internal server error|bad gateway|gateway timeout|slowdown|slow down|throttl|status code:? 5\d\d"
    r"|http 5\d\d|temporary failure in name resolution",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Remote:
    """A DVC remote as the repository's merged config names it."""

    name: str
    url: str
    endpointurl: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def _redact(text: str) -> str:
    """`text` with the values of credential variables masked (DVC output goes into messages),
    without DVC's support footer."""
    text = "\n".join(line for line in text.splitlines() if not line.startswith("Having any troubles?")).strip()
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{var}>")
    return text


def _dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dvc", *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)


def _require_repo(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise RemoteError(f"{root} is not a DVC repository: run `dvc init` there (or clone one that is)")


def default_remote(root: Path) -> Remote | None:
    """The default remote (`core.remote` at any config level) of the DVC repo at `root`, or None."""
    root = Path(root)
    _require_repo(root)
    done = _dvc(root, "config", "--list")
    if done.returncode != 0:
        raise RemoteError(f"`dvc config --list` failed in {root}:\n{_redact((done.stderr + done.stdout).strip())}")
    conf: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    name = conf.get("core.remote")
    if not name:
        return None
    url = conf.get(f"remote.{name}.url")
    if not url:
        raise RemoteError(
            f"the default DVC remote {name!r} of {root} has no url: run `dvc remote modify {name} url <url>`"
        )
    return Remote(name=name, url=url, endpointurl=conf.get(f"remote.{name}.endpointurl") or None)


def _env_for(remote: Remote) -> tuple[dict[str, str], str]:
    """The environment for the dvc subprocess, and a phrase saying which endpoint it will use."""
    env = dict(os.environ)
    if not remote.is_s3:
        return env, ""
    endpoint, var = s3_endpoint_setting()
    if remote.endpointurl:
        if endpoint and endpoint != remote.endpointurl:
            log.warning("DVC remote %r sets endpointurl %s in the DVC config; it wins over %s=%s",
                        remote.name, remote.endpointurl, var, endpoint)
        return env, f" at {remote.endpointurl} (remote.{remote.name}.endpointurl in the DVC config)"
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint  # DVC does not read GENLOOP_S3_ENDPOINT_URL itself
        return env, f" at {endpoint} ({var})"
    return env, " at the AWS default endpoint"


def _fix_hint(remote: Remote) -> str:
    if not remote.is_s3:
        return f"Check the remote's url (`dvc remote modify {remote.name} url <url>`)."
    if remote.endpointurl:
        return (f"Check remote.{remote.name}.endpointurl (`dvc remote modify {remote.name} endpointurl <url>`) "
                "and the AWS credentials in the environment.")
    endpoint, var = s3_endpoint_setting()
    fix = var if endpoint else f"{var} (unset: the AWS default endpoint is used)"
    return f"Check {fix} and the AWS credentials in the environment."


# What a data version is: data/raw's files (data.dvc) and the ledger naming them (its own .dvc).
DATA_DVC = "data.dvc"
LEDGER_DVC = "data/ledger.parquet.dvc"


def data_targets(root: Path) -> list[str]:
    """The .dvc files of the data version; the ledger's is absent where an older genloop kept
    the ledger inside data/raw (data.dvc then versions both)."""
    if not (root / DATA_DVC).exists():
        raise RemoteError(f"{root / DATA_DVC} not found: run `genloop collect` (collect.dvc_add=true) and commit it")
    return [DATA_DVC, *([LEDGER_DVC] if (root / LEDGER_DVC).exists() else [])]


def _transfer(root: Path, verb: str, remote: Remote | None) -> Remote:
    root = Path(root)
    _require_repo(root)
    targets = data_targets(root)
    what = " and ".join(targets)
    remote = remote or default_remote(root)
    if remote is None:
        raise RemoteError(
            f"cannot {verb} {what}: the DVC repository {root} has no default remote; "
            "run `dvc remote add -d <name> <url>` there (e.g. s3://bucket/dvc)"
        )
    env, where = _env_for(remote)
    log.info("dvc %s %s: remote %r (%s)%s", verb, what, remote.name, remote.url, where)
    done = _dvc(root, verb, "--remote", remote.name, *targets, env=env)
    if done.returncode != 0:
        output = _redact((done.stderr + done.stdout).strip())
        error = RemoteUnreachable if _TRANSIENT.search(output) else RemoteError
        preposition = "to" if verb == "push" else "from"
        raise error(
            f"cannot {verb} {what} {preposition} DVC remote {remote.name!r} ({remote.url}){where}:\n"
            f"{output}\n{_fix_hint(remote)}"
        )
    return remote


def push(root: Path, remote: Remote | None = None) -> Remote:
    """`dvc push` of the data version (data.dvc and the ledger's .dvc) to `remote` (default: the
    repo's default remote); returns the remote used.

    Raises RemoteUnreachable when the remote did not answer (retry later), RemoteError otherwise.
    """
    return _transfer(root, "push", remote)


def pull(root: Path, remote: Remote | None = None) -> Remote:
    """`dvc pull` of the data version the repository names: fetch it from the remote and check it
    out (a fresh clone gets data/raw and the ledger back); returns the remote used. Errors as for `push`."""
    return _transfer(root, "pull", remote)
