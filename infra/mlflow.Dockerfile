# syntax=docker/dockerfile:1
# The MLflow tracking server of infra/docker-compose.yml. The official MLflow image has neither
# a PostgreSQL driver nor boto3; this one installs MLflow at the version genloop's lock pins
# (the server then speaks exactly the clients' protocol), boto3 from the lock for the S3
# artefact store, and psycopg2 for the PostgreSQL backend store.
FROM python:3.11-slim
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --disable-pip-version-check -c /tmp/requirements.lock \
        mlflow boto3 psycopg2-binary==2.9.13 \
    && rm /tmp/requirements.lock \
    && mlflow --version
ENV MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--serve-artifacts"]
