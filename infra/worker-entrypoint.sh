#!/usr/bin/env bash
# genloop's Prefect worker: the command of the worker image (infra/Dockerfile's CMD), and the
# same command as a plain process on any machine with genloop installed:
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api GENLOOP_WORKSPACE=. infra/worker-entrypoint.sh
#
# It makes GENLOOP_WORKSPACE a genloop workspace if it is not one yet (workspace-init.sh beside
# this script), then replaces itself with `prefect worker start` on the pool GENLOOP_WORK_POOL.
# Prefect creates the pool when it is missing (`--create-pool-if-not-found`, on by default).
# Flow runs of a process pool are children of this worker: they inherit its environment
# (MLFLOW_TRACKING_URI, GENLOOP_S3_ENDPOINT_URL, AWS_*) and, with the GPU reservation of the
# container, its GPUs.
#
# Environment:
#   PREFECT_API_URL          the Prefect server's API (required)
#   GENLOOP_WORK_POOL        pool to serve (default genloop-local, the pool of flows/prefect.yaml)
#   GENLOOP_WORK_POOL_TYPE   worker type (default process; another type needs its Prefect
#                            integration package in the image, e.g. prefect-kubernetes)
#   GENLOOP_WORKSPACE        the workspace folder (default: the current directory)
#   GENLOOP_WORKER_NAME      the worker's name in the Prefect UI (default: Prefect picks one)
#   GENLOOP_WORKER_LIMIT     most flow runs at once (default: no limit)
#   PREFECT_WORKER_WEBSERVER_HOST/PORT  where the health check answers (Prefect's defaults: 0.0.0.0:8080)
set -euo pipefail

: "${PREFECT_API_URL:?PREFECT_API_URL must point at the Prefect server API, e.g. http://prefect-server:4200/api}"
pool="${GENLOOP_WORK_POOL:-genloop-local}"
pool_type="${GENLOOP_WORK_POOL_TYPE:-process}"
workspace="${GENLOOP_WORKSPACE:-$PWD}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

"$here/workspace-init.sh" "$workspace"
cd "$workspace"

# --with-healthcheck serves GET /health (200 while the worker polls its pool): the health
# check of the compose service and of a Kubernetes liveness probe
args=(worker start --pool "$pool" --type "$pool_type" --with-healthcheck)
if [[ -n "${GENLOOP_WORKER_NAME:-}" ]]; then
  args+=(--name "$GENLOOP_WORKER_NAME")
fi
if [[ -n "${GENLOOP_WORKER_LIMIT:-}" ]]; then
  args+=(--limit "$GENLOOP_WORKER_LIMIT")
fi
echo "genloop worker: pool ${pool} (${pool_type}), workspace ${workspace}, API ${PREFECT_API_URL}"
exec prefect "${args[@]}"
