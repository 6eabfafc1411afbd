#!/usr/bin/env bash
# The one-shot `setup` service of docker-compose.yml: certificates (`fedmq certs`) and signing
# keys with store credentials (`fedmq keys -c`) for the server, client-1 ... client-N and, with a
# HierarchicalFL config, the edges <run>-edge-1 ... <run>-edge-M, written once into the `secrets`
# volume (mounted at /var/lib/fedmq/secrets).
#
# N is client_num_in_total of the config ($FEDMQ_CONFIG), M its group_num, <run> its run_id
# (env FEDMQ_RUN_ID overrides it, as it does for every fedmq command): an edge's id, which is its
# certificate's name, its MQTT user and the run id of its site, is <run>-edge-<k>
# (fedmq::edge::edge_id). Flat config: keys/<id>.key/.pub/.s3/.s3-policy.json for every
# participant (`fedmq keys --participants ... -c`). HierarchicalFL: `fedmq keys --hierarchy -c`
# writes the whole hierarchy: keys/ holds server and the edges (the cloud's keyring), and
# keys/<run>-edge-<k>/ that site's `server` (the edge as its devices' server) and its devices
# only (fedmq::edge::sites with random_seed), whose store policies cover the site's run; each
# device finds its site's directory from the same config.
# The broker's and the store's certificates are valid for the compose host names `mosquitto` and
# `minio`. Runs as root in the fedmq image so that it can hand the files to their readers: all to
# fedmq (uid 10001), broker.key to Mosquitto's user (uid 1883). Idempotent: a second
# `docker compose up` finds the files and leaves them; after changing N, M or the run id, run
# `docker compose down -v` (new volumes, new keys, an empty bucket and broker).
set -euo pipefail

CONFIG="${FEDMQ_CONFIG:-/etc/fedmq/fedml_config_compose.yaml}"
DIR="${FEDMQ_SECRETS_DIR:-/var/lib/fedmq/secrets}"
WORKDIR="${FEDMQ_WORKDIR:-/var/lib/fedmq}"   # where the config's relative paths start
HOSTS="${FEDMQ_CERT_HOSTS:-mosquitto,minio,localhost,127.0.0.1}"
FEDMQ_UID="${FEDMQ_UID:-10001}"
MOSQUITTO_UID="${MOSQUITTO_UID:-1883}"

die() { echo "setup: error: $*" >&2; exit 1; }
# The first value of a key in the config (the configs of ./config have one of each).
value() { sed -nE "s/^[[:space:]]*$1:[[:space:]]*\"?([^\"#[:space:]]+)\"?.*/\\1/p" "$CONFIG" | head -n1; }

[[ -r "$CONFIG" ]] || die "config $CONFIG not found"
[[ -n "${FEDMQ_S3_SAK:-}" ]] || die "FEDMQ_S3_SAK is not set (the store's secret: export it before docker compose up)"
CLIENTS="$(value client_num_in_total)"
[[ "$CLIENTS" =~ ^[0-9]+$ && "$CLIENTS" -ge 1 ]] || die "no client_num_in_total in $CONFIG"
RUN="${FEDMQ_RUN_ID:-$(value run_id)}"
[[ -n "$RUN" ]] || die "no common_args.run_id in $CONFIG"
EDGES=0
if [[ "$(value federated_optimizer)" == "HierarchicalFL" ]]; then
  EDGES="$(value group_num)"
  [[ "$EDGES" =~ ^[0-9]+$ && "$EDGES" -ge 1 ]] || die "HierarchicalFL without a group_num in $CONFIG"
fi

WANT="run=$RUN clients=$CLIENTS edges=$EDGES"
STAMP="$DIR/.setup-done"
if [[ -f "$STAMP" ]]; then
  HAVE="$(cat "$STAMP")"
  [[ "$HAVE" == "$WANT" ]] || die "the secrets volume was made for $HAVE, the config now asks for $WANT: run 'docker compose down -v' first"
  echo "setup: certificates and keys already in $DIR ($HAVE)"
  exit 0
fi

PARTICIPANTS="server"
for ((i = 1; i <= CLIENTS; i++)); do PARTICIPANTS+=",client-$i"; done
for ((k = 1; k <= EDGES; k++)); do PARTICIPANTS+=",$RUN-edge-$k"; done

mkdir -p "$DIR"
cd "$DIR"
rm -rf certs keys   # left over from an interrupted setup
fedmq certs --out certs --participants "$PARTICIPANTS" --hosts "$HOSTS"
# `fedmq keys -c` reads the store's secret, bucket and run id from the config (and checks it: its
# CA, secrets/certs/ca.pem, is there now; the per-participant `{id}` certificate paths are not
# checked), relative to the working directory of the fedmq containers.
if ((EDGES > 0)); then
  (cd "$WORKDIR" && fedmq keys --out "$DIR/keys" --hierarchy -c "$CONFIG")
  # The edges' ids above must be those fedmq gives them: keys/<run>-edge-<k>/ is edge k's site.
  for ((k = 1; k <= EDGES; k++)); do
    [[ -f "keys/$RUN-edge-$k.key" && -f "keys/$RUN-edge-$k/server.key" ]] \
      || die "fedmq keys --hierarchy wrote no keys for $RUN-edge-$k (is the run id $RUN?)"
  done
else
  (cd "$WORKDIR" && fedmq keys --out "$DIR/keys" --participants "$PARTICIPANTS" -c "$CONFIG")
fi

# Every container mounts this volume: the CA's key, needed only to issue certificates, goes.
rm -f certs/ca.key
chown -R "$FEDMQ_UID:$FEDMQ_UID" "$DIR"
chmod 0755 "$DIR" certs keys
find keys -mindepth 1 -type d -exec chmod 0755 {} +
chown "$MOSQUITTO_UID:$MOSQUITTO_UID" certs/broker.key
echo "$WANT" > "$STAMP"
echo "setup: certificates and keys for $PARTICIPANTS in $DIR"
