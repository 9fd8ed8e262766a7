#!/usr/bin/env bash
# Point this checkout's DVC at the cluster's S3 remote, in .dvc/config.local (never committed,
# never in the image), so that `dvc pull --with-deps shards tokenizer` fetches the training data.
# Run from the repository root (/app in the image):
#
#   GALEN_DVC_REMOTE_URL=s3://galen/dvc bash infra/scripts/dvc-s3-remote.sh
#
# Credentials are read by dvc-s3/boto3 from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the
# instance role on AWS); an S3-compatible endpoint (MinIO, Ceph, ...) from AWS_ENDPOINT_URL,
# falling back to MLFLOW_S3_ENDPOINT_URL.
set -euo pipefail

: "${GALEN_DVC_REMOTE_URL:?set GALEN_DVC_REMOTE_URL to the DVC remote, e.g. s3://galen/dvc}"
[ -f dvc.yaml ] && [ -d .dvc ] || { echo "run from the repository root (no dvc.yaml/.dvc here: $PWD)" >&2; exit 2; }

# The image holds no .git: DVC then works without an SCM.
if [ ! -e .git ]; then
    dvc config --local core.no_scm true
fi
dvc remote add --local --force --default galen-s3 "$GALEN_DVC_REMOTE_URL"

endpoint="${AWS_ENDPOINT_URL:-${MLFLOW_S3_ENDPOINT_URL:-}}"
if [ -n "$endpoint" ]; then
    dvc remote modify --local galen-s3 endpointurl "$endpoint"
fi
if [ -n "${AWS_DEFAULT_REGION:-}" ]; then
    dvc remote modify --local galen-s3 region "$AWS_DEFAULT_REGION"
fi
echo "dvc remote galen-s3 -> $GALEN_DVC_REMOTE_URL${endpoint:+ (endpoint $endpoint)}"
