#!/usr/bin/env bash
# The Galen MLflow tracking server + model registry, proxying artifacts to S3.
#
#   bash infra/mlflow/run-mlflow-server.sh                     # sqlite ./mlflow.db, artifacts s3://galen/mlflow-artifacts
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PW@db:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://galen/mlflow-artifacts bash infra/mlflow/run-mlflow-server.sh
#
# Artifacts are proxied (--serve-artifacts): clients (training, Ray Serve) need only
# MLFLOW_TRACKING_URI=http://<this host>:5000; the server alone holds the S3 credentials
# (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL for a non-AWS store).
# PostgreSQL needs psycopg2 (installed in the image of infra/docker/Dockerfile).
# Extra arguments go to `mlflow server` unchanged.
set -euo pipefail

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-s3://galen/mlflow-artifacts}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"

args=(
    --backend-store-uri "$backend"
    --artifacts-destination "$artifacts"
    --serve-artifacts
    --host "$host"
    --port "$port"
    --workers "$workers"
)
# MLflow 3 answers only Host headers of localhost / private IPs unless told otherwise: name the
# server's DNS names here (e.g. mlflow.galen.svc.cluster.local,mlflow.galen.svc,mlflow).
if [ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]; then
    args+=(--allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS")
fi

echo "mlflow server: backend ${backend%%://*}://..., artifacts $artifacts, http://$host:$port" >&2
exec mlflow server "${args[@]}" "$@"
