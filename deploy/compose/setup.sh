#!/usr/bin/env bash
# The one-shot `setup` service of docker-compose.yml: certificates (`fedmq certs`) and signing
# keys with store credentials (`fedmq keys -c`) for the server, client-1 ... client-N and
# edge-1 ... edge-M, written once into the `secrets` volume (mounted at /var/lib/fedmq/secrets).
#
# N is client_num_in_total of the config ($FEDMQ_CONFIG), M its group_num (HierarchicalFL's
# edges; none when the config has no group_num). The
# broker's and the store's certificates are valid for the compose host names `mosquitto` and
# `minio`. Runs as root in the fedmq image so that it can hand the files to their readers: all to
# fedmq (uid 10001), broker.key to Mosquitto's user (uid 1883). Idempotent: a second
# `docker compose up` finds the files and leaves them; after changing N or M, run
# `docker compose down -v` (new volumes, new keys, an empty bucket and broker).
set -euo pipefail

CONFIG="${FEDMQ_CONFIG:-/etc/fedmq/fedml_config_compose.yaml}"
DIR="${FEDMQ_SECRETS_DIR:-/var/lib/fedmq/secrets}"
WORKDIR="${FEDMQ_WORKDIR:-/var/lib/fedmq}"   # where the config's relative paths start
HOSTS="${FEDMQ_CERT_HOSTS:-mosquitto,minio,localhost,127.0.0.1}"
FEDMQ_UID="${FEDMQ_UID:-10001}"
MOSQUITTO_UID="${MOSQUITTO_UID:-1883}"

die() { echo "setup: error: $*" >&2; exit 1; }

[[ -r "$CONFIG" ]] || die "config $CONFIG not found"
[[ -n "${FEDMQ_S3_SAK:-}" ]] || die "FEDMQ_S3_SAK is not set (the store's secret: export it before docker compose up)"
CLIENTS="$(sed -nE 's/^[[:space:]]*client_num_in_total:[[:space:]]*([0-9]+).*/\1/p' "$CONFIG" | head -n1)"
[[ "$CLIENTS" =~ ^[0-9]+$ && "$CLIENTS" -ge 1 ]] || die "no client_num_in_total in $CONFIG"
EDGES="$(sed -nE 's/^[[:space:]]*group_num:[[:space:]]*([0-9]+).*/\1/p' "$CONFIG" | head -n1)"
EDGES="${EDGES:-0}"

WANT="clients=$CLIENTS edges=$EDGES"
STAMP="$DIR/.setup-done"
if [[ -f "$STAMP" ]]; then
  HAVE="$(cat "$STAMP")"
  [[ "$HAVE" == "$WANT" ]] || die "the secrets volume was made for $HAVE, the config now asks for $WANT: run 'docker compose down -v' first"
  echo "setup: certificates and keys already in $DIR ($HAVE)"
  exit 0
fi

PARTICIPANTS="server"
for ((i = 1; i <= CLIENTS; i++)); do PARTICIPANTS+=",client-$i"; done
for ((i = 1; i <= EDGES; i++)); do PARTICIPANTS+=",edge-$i"; done

mkdir -p "$DIR"
cd "$DIR"
rm -rf certs keys   # left over from an interrupted setup
fedmq certs --out certs --participants "$PARTICIPANTS" --hosts "$HOSTS"
# `fedmq keys -c` reads the store's secret, bucket and run id from the config. Its per-participant
# certificate paths ({id}) name no file before a participant has its id: leave them out here.
KEYS_CONFIG="$(mktemp --suffix=.yaml)"
sed -E '/^[[:space:]]*MQTT_(CERT|KEY)_PATH:/d' "$CONFIG" > "$KEYS_CONFIG"
(cd "$WORKDIR" && fedmq keys --out "$DIR/keys" --participants "$PARTICIPANTS" -c "$KEYS_CONFIG")
rm -f "$KEYS_CONFIG"
# HierarchicalFL: each site signs with the keys in keys/edge-<k>/ (there the edge is `server`,
# src/edge/mod.rs site_config). A device belongs to one site, drawn from random_seed; every
# site directory holds keys for all devices, so each finds its own wherever it lands.
DEVICES="server"
for ((i = 1; i <= CLIENTS; i++)); do DEVICES+=",client-$i"; done
for ((k = 1; k <= EDGES; k++)); do
  fedmq keys --out "$DIR/keys/edge-$k" --participants "$DEVICES"
done

# Every container mounts this volume: the CA's key, needed only to issue certificates, goes.
rm -f certs/ca.key
chown -R "$FEDMQ_UID:$FEDMQ_UID" "$DIR"
chmod 0755 "$DIR" certs keys
find keys -mindepth 1 -type d -exec chmod 0755 {} +
chown "$MOSQUITTO_UID:$MOSQUITTO_UID" certs/broker.key
echo "$WANT" > "$STAMP"
echo "setup: certificates and keys for $PARTICIPANTS in $DIR"
