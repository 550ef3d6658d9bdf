#!/usr/bin/env bash
# Validate the deployment files without a Docker engine:
#   - docker-compose.yml: `docker compose config` (v2 plugin) or, failing
#     that, Debian's docker-compose v1 on a copy without the top-level
#     `name:` (v1 predates it); every bind-mounted file must exist;
#   - Prometheus: `promtool check config`, `check rules`, `test rules`;
#   - Grafana: dashboard JSON parses and every PromQL expression in it
#     parses (checked by promtool as recording rules);
#   - OpenTelemetry Collector config: YAML parses and every pipeline names
#     only components defined above it;
#   - with a built binary that has `check-config` (pass its path as $1), the
#     gateway's environment from docker-compose.yml is accepted by it.
# Needs: python3 with PyYAML; promtool (Debian: apt-get install prometheus);
# docker compose or docker-compose (Debian: apt-get install docker-compose).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fail=1; }

# --- image build context: no local state (audit databases) may be baked in
for pat in 'config/*.db' 'config/*.db-*'; do
  if grep -qxF "$pat" .dockerignore; then ok ".dockerignore excludes $pat"; else bad ".dockerignore must exclude $pat (the README's serve writes the audit trail there)"; fi
done
if grep -qE '^COPY +config/ ' Dockerfile && ! grep -qxF 'config/*.db' .dockerignore; then bad "Dockerfile copies config/ with audit state"; fi

# --- compose
if docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yml config -q && ok "docker compose config" || bad "docker compose config"
elif command -v docker-compose >/dev/null 2>&1; then
  grep -v '^name: ' docker-compose.yml > .compose-v1-check.yml
  if docker-compose -f .compose-v1-check.yml config -q; then ok "docker-compose (v1) config"; else bad "docker-compose (v1) config"; fi
  rm -f .compose-v1-check.yml
else
  echo "skip docker compose config: neither the v2 plugin nor docker-compose is installed"
fi

python3 - "$tmp" <<'PY' || fail=1
import json, os, re, sys, yaml
tmp = sys.argv[1]
bad = 0
def fail(msg):
    global bad
    bad = 1
    print("FAIL", msg)

compose = yaml.safe_load(open("docker-compose.yml"))
for name, svc in compose["services"].items():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("./") and not os.path.exists(src):
            fail(f"compose service {name}: bind mount {src} does not exist")
gw = compose["services"]["gateway"]
want_cmd = ["serve", "--config", "/etc/carewall/carewall.toml"]
if gw.get("command") != want_cmd:
    fail(f"gateway command is {gw.get('command')}, expected {want_cmd}")
need = ["CAREWALL__SERVER__LISTEN", "CAREWALL__UPSTREAM__BASE_URL", "CAREWALL__UPSTREAM__API_KEY",
        "CAREWALL__AUDIT__URL", "CAREWALL__AUDIT__ENCRYPTION_KEY", "CAREWALL__ADMIN__TOKEN",
        "CAREWALL__TELEMETRY__OTLP_ENDPOINT"]
missing = [k for k in need if k not in gw["environment"]]
if missing:
    fail(f"gateway environment lacks {missing}")
# Resolve ${VAR:-default} as compose would with nothing set, for check-config.
env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in gw["environment"].items()}
json.dump(env, open(os.path.join(tmp, "gateway-env.json"), "w"))
print("ok   compose: bind mounts exist, gateway command and environment names")

col = yaml.safe_load(open("deploy/otel-collector.yaml"))
for pname, p in col["service"]["pipelines"].items():
    for kind in ("receivers", "processors", "exporters"):
        for comp in p.get(kind, []):
            if comp not in (col.get(kind) or {}):
                fail(f"collector pipeline {pname}: {kind[:-1]} {comp} is not defined")
for ext in col["service"].get("extensions", []):
    if ext not in (col.get("extensions") or {}):
        fail(f"collector extension {ext} is not defined")
print("ok   otel-collector config: YAML and pipeline references")

dash = json.load(open("deploy/grafana/dashboards/carewall.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
rules = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:expr{i}", "expr": e.replace("$__range", "1h")} for i, e in enumerate(exprs)]}]}
yaml.safe_dump(rules, open(os.path.join(tmp, "dashboard-rules.yml"), "w"))
# Every recorded series the dashboard reads must be defined by a rule.
defined = {r["record"] for g in yaml.safe_load(open("deploy/prometheus/rules/carewall.yml"))["groups"]
           for r in g["rules"] if "record" in r}
for e in exprs:
    for used in re.findall(r"carewall:[a-z0-9_:]+", e):
        if used not in defined:
            fail(f"dashboard reads {used}, which no recording rule defines")
for f in ["deploy/grafana/provisioning/datasources/datasources.yml",
          "deploy/grafana/provisioning/dashboards/dashboards.yml"]:
    yaml.safe_load(open(f))
print(f"ok   grafana: dashboard JSON ({len(exprs)} queries), provisioning YAML")
sys.exit(bad)
PY

# --- prometheus
if command -v promtool >/dev/null 2>&1; then
  promtool check config --syntax-only deploy/prometheus/prometheus.yml >/dev/null && ok "promtool check config" || bad "promtool check config"
  promtool check rules deploy/prometheus/rules/*.yml >/dev/null && ok "promtool check rules" || bad "promtool check rules"
  promtool test rules deploy/prometheus/tests/*.yml >/dev/null && ok "promtool test rules" || bad "promtool test rules"
  promtool check rules "$tmp/dashboard-rules.yml" >/dev/null && ok "promtool parses every dashboard query" || bad "dashboard queries"
else
  echo "skip promtool checks: promtool is not installed (Debian: apt-get install prometheus)"
fi

# --- the binary accepts the compose environment
if [ -n "$bin" ]; then
  if "$bin" check-config --help >/dev/null 2>&1; then
    args=()
    while IFS= read -r kv; do args+=("$kv"); done < <(python3 -c 'import json,sys; [print(f"{k}={v}") for k,v in json.load(open(sys.argv[1])).items()]' "$tmp/gateway-env.json")
    if env "${args[@]}" "$bin" check-config --config config/carewall.toml; then ok "carewall check-config with the compose environment"; else bad "carewall check-config with the compose environment"; fi
  else
    echo "skip check-config: $bin has no check-config subcommand"
  fi
fi

if [ "$fail" = 0 ]; then echo "deploy/check.sh: all checks passed"; else echo "deploy/check.sh: some checks FAILED"; exit 1; fi
