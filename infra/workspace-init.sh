#!/usr/bin/env bash
# Make a folder a genloop workspace, once, and point its DVC remote at this environment's.
#
#   infra/workspace-init.sh [WORKSPACE]      (default: $GENLOOP_WORKSPACE)
#
# A folder without params.yaml receives genloop's params.yaml, dvc.yaml, flows/ and src/ (the
# stages of dvc.yaml depend on src/) from GENLOOP_SOURCE (default /opt/genloop, where the image
# keeps them) and becomes a git + DVC repository with one commit, so runs carry a git commit.
# A folder that has params.yaml is left as it is: the team's params and history stay theirs.
#
# GENLOOP_DVC_REMOTE (e.g. s3://genloop-data/dvc), when set, becomes the default DVC remote in
# .dvc/config.local: local to this machine and never committed, like every endpoint and
# credential. genloop hands GENLOOP_S3_ENDPOINT_URL to dvc itself (src/genloop/mlops/dvc_remote.py).
# Run by the worker entrypoint, by the init container of every Kubernetes pod that uses the
# workspace volume, and safe to run any number of times.
set -euo pipefail

ws="${1:-${GENLOOP_WORKSPACE:?give the workspace folder as argument or in GENLOOP_WORKSPACE}}"
src="${GENLOOP_SOURCE:-/opt/genloop}"
mkdir -p "$ws"

if [[ ! -f "$ws/params.yaml" ]]; then
  for item in params.yaml dvc.yaml .dvcignore .gitignore flows src; do
    [[ -e "$src/$item" ]] || { echo "workspace-init: $src/$item not found (GENLOOP_SOURCE=$src)" >&2; exit 2; }
  done
  tar -C "$src" --exclude=__pycache__ --exclude='*.egg-info' -cf - \
    params.yaml dvc.yaml .dvcignore .gitignore flows src | tar -C "$ws" -xf -
  (
    cd "$ws"
    git init -q
    dvc init -q
    git add -A
    git -c user.name="genloop workspace-init" -c user.email="genloop-workspace-init@localhost" \
      commit -q -m "genloop workspace from ${src}"
  )
  echo "workspace-init: new genloop workspace in ${ws} (from ${src})"
fi

if [[ -n "${GENLOOP_DVC_REMOTE:-}" ]]; then
  (cd "$ws" && dvc remote add --local --force --default genloop "$GENLOOP_DVC_REMOTE")
  echo "workspace-init: default DVC remote 'genloop' -> ${GENLOOP_DVC_REMOTE} (.dvc/config.local)"
fi
