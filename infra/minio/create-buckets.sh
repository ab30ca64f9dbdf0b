#!/bin/sh
# minio-init (infra/docker-compose.yml): the buckets, and genloop's own MinIO user, so that
# genloop and MLflow never hold the MinIO root credentials. Safe to run again.
#   GENLOOP_MLFLOW_BUCKET  MLflow's artefact store (--artifacts-destination s3://<bucket>)
#   GENLOOP_DATA_BUCKET    the DVC remote (s3://<bucket>/dvc) and generate/optimize sinks
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY  genloop's user, with the readwrite policy
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
for bucket in "$GENLOOP_MLFLOW_BUCKET" "$GENLOOP_DATA_BUCKET"; do
  mc mb --ignore-existing "local/$bucket"
done
mc admin user add local "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
# attaching a policy that is already attached is an error for mc: check first (plain sh, the
# mc image has no grep)
info="$(mc admin user info local "$AWS_ACCESS_KEY_ID")"
case "$info" in
  *readwrite*) ;;
  *) mc admin policy attach local readwrite --user "$AWS_ACCESS_KEY_ID" ;;
esac
echo "minio-init: buckets $GENLOOP_MLFLOW_BUCKET, $GENLOOP_DATA_BUCKET; user $AWS_ACCESS_KEY_ID (readwrite)"
