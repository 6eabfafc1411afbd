#!/bin/sh
# The one-shot `minio-init` service of docker-compose.yml and Job of the Helm chart (image
# minio/mc; the chart's copy is deploy/helm/fedmq/files/minio-init.sh): creates the bucket
# and, for every participant, a MinIO user with its own credential (`<id>.s3` from `fedmq keys
# -c`) and its policy (`<id>.s3-policy.json`: a client may write only its own updates), as
# docs/SECURITY.md describes. HierarchicalFL (`fedmq keys --hierarchy`): the server's and the
# edges' files are in $FEDMQ_KEYS_DIR, each device's in its site's subdirectory
# <run>-edge-<k>/ (its policy covers that site's run); a device id is in one site only.
# Idempotent. Plain sh and mc only: the mc image has few tools.
set -eu

ALIAS=fedmq
ENDPOINT="${MINIO_ENDPOINT:-http://minio:9000}"
KEYS="${FEDMQ_KEYS_DIR:-/secrets/keys}"
BUCKET="${FEDMQ_BUCKET:-fedmq}"
: "${MINIO_ROOT_USER:?}" "${FEDMQ_S3_SAK:?FEDMQ_S3_SAK is not set}"

# MinIO may still be starting (on Kubernetes nothing orders this Job after it): wait up to 2 min.
tries=0
until mc alias set "$ALIAS" "$ENDPOINT" "$MINIO_ROOT_USER" "$FEDMQ_S3_SAK" >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    mc alias set "$ALIAS" "$ENDPOINT" "$MINIO_ROOT_USER" "$FEDMQ_S3_SAK"   # shows why
    echo "minio-init: MinIO at $ENDPOINT did not answer" >&2
    exit 1
  fi
  sleep 2
done
mc mb --ignore-existing "$ALIAS/$BUCKET"

found=0
for cred in "$KEYS"/*.s3 "$KEYS"/*/*.s3; do
  [ -f "$cred" ] || continue
  found=$((found + 1))
  dir="${cred%/*}"
  id="${cred##*/}"
  id="${id%.s3}"
  policy="fedmq-$id"
  # The file is an env file: FEDMQ_S3_AKI=<id>, FEDMQ_S3_SAK=<its secret>. Read it in a subshell
  # so that the root password above is not replaced.
  (
    # shellcheck source=/dev/null
    . "$cred"
    mc admin user add "$ALIAS" "$FEDMQ_S3_AKI" "$FEDMQ_S3_SAK" >/dev/null
    mc admin policy create "$ALIAS" "$policy" "$dir/$id.s3-policy.json" >/dev/null
    if ! mc admin policy attach "$ALIAS" "$policy" --user "$FEDMQ_S3_AKI" >/dev/null 2>&1; then
      # Attaching twice is an error; make sure that is why it failed.
      case "$(mc admin user info "$ALIAS" "$FEDMQ_S3_AKI")" in
        *"$policy"*) ;;
        *) echo "minio-init: cannot attach policy $policy to $FEDMQ_S3_AKI" >&2; exit 1 ;;
      esac
    fi
  )
  echo "minio-init: user $id with policy $policy ($dir/$id.s3-policy.json)"
done
[ "$found" -gt 0 ] || { echo "minio-init: no <id>.s3 credentials in $KEYS (did setup run?)" >&2; exit 1; }
echo "minio-init: bucket $BUCKET and $found participant(s) ready"
