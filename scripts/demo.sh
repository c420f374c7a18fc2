#!/usr/bin/env bash
# `make demo`: a short tour of Ember on one machine. Brings up the whole single-node stack
# (PostgreSQL, registry, API, controller, edge, host agent), deploys the hello-http sample
# into a real microVM, routes a TCP port of the edge to it and fetches the page through
# the edge. Safe to re-run: every step is idempotent. Leaves the stack running.
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER="$PWD/.venv/bin/ember"
APP=hello-http

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
say() { printf '    %s\n' "$*"; }
expect_exit() {  # expect_exit CODE WHAT -- COMMAND...
  local want=$1 what=$2; shift 3
  set +e; "$@" >/dev/null 2>/tmp/ember-demo.err; local got=$?; set -e
  printf '    %-52s -> exit %s (%s)\n' "$what" "$got" "$(head -n1 /tmp/ember-demo.err)"
  [ "$got" = "$want" ] || { echo "demo: expected exit $want" >&2; exit 1; }
}

if [ "$(id -u)" != 0 ]; then
  echo "demo: run it as root: the host agent needs tap devices, nftables and cgroups" >&2
  exit 1
fi

# Put `ember` on PATH for the newcomer (root on a fresh machine): a symlink, nothing else.
if [ -w /usr/local/bin ] && { [ ! -e /usr/local/bin/ember ] || [ -L /usr/local/bin/ember ]; }; then
  ln -sf "$PWD/.venv/bin/ember" /usr/local/bin/ember
fi

step "1. Bring up the single-node stack"
say "PostgreSQL (the event log), the OCI registry, the API, the controller, the edge"
say "(HAProxy) and the host agent, which runs every instance as its own microVM."
$EMBER dev up

step "2. Who am I? (the local admin's token is in the CLI config)"
$EMBER whoami

step "3. Build the sample app into an OCI image (from Debian packages, no Docker)"
.venv/bin/python -m ember.dev.examples build "$APP" --out "examples/$APP/build/oci"
(cd "examples/$APP" && $EMBER manifest validate)

step "4. Create the app and its environment (idempotent)"
$EMBER apps create "$APP"
$EMBER envs create prod --app "$APP"

step "5. Deploy: push the image by digest, release it, wait for a healthy microVM"
say "The controller places the instance, the agent pulls the image, builds its root"
say "filesystem, boots the VM and health-checks it; 'ember deploy' follows along."
(cd "examples/$APP" && $EMBER deploy --image build/oci --timeout 5m)

step "6. Errors are clear and exit codes stable (docs/specs/cli.md)"
expect_exit 3 "ember apps show nope" -- $EMBER apps show nope
expect_exit 5 "ember whoami with a bad token" -- env EMBER_API_TOKEN=ember_pat_bad $EMBER whoami
expect_exit 2 "ember scale web=-1" -- $EMBER scale web=-1 --app "$APP"

step "7. Route a raw TCP port of the edge to the app's port 8080"
tcp_port() {  # the edge port of the app's TCP route to web:8080, if there is one
  $EMBER routes list --app "$APP" --json | .venv/bin/python -c '
import json, sys
print(next((str(r["port"]) for r in json.load(sys.stdin)
            if r["kind"] == "tcp" and r["process"] == "web" and r["backend_port"] == 8080), ""))'
}
port=$(tcp_port)
if [ -z "$port" ]; then
  $EMBER routes create --tcp --port auto --process web --backend-port 8080 --app "$APP"
  port=$(tcp_port)
fi
$EMBER routes list --app "$APP"

step "8. What runs where: desired vs running, per instance"
$EMBER status --app "$APP"
$EMBER hosts list

step "9. The workload's console output, through the control plane"
$EMBER logs --app "$APP" --lines 15

step "10. Every change is an event; views are projections of the log"
$EMBER admin events streams | head -n 12
$EMBER admin projections verify

cat <<'MSG'

Try next:
  ember scale web=3 --app hello-http     # three microVMs behind the same edge port
  ember logs -f --app hello-http         # follow the console output (Ctrl-C stops)
  cd examples/hello-http && ember deploy --image build/oci
                                         # a new release, rolled out instance by instance
  ember rollback --app hello-http        # back to the previous release's contents
  ember routes create --hostname hello-tls --process web --backend-port 8443 \
      --proxy-protocol v2 --app hello-tls  # TLS passthrough routed on SNI (see examples/)
  ember dev down                         # stop everything; data stays in $EMBER_HOME
MSG

step "11. The page, served by a microVM through the edge (curl http://127.0.0.1:$port/)"
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  if page=$(curl -fsS --max-time 5 "http://127.0.0.1:$port/"); then
    printf '%s\n' "$page"
    exit 0
  fi
  sleep 1   # the edge picks a new route up within a second
done
echo "demo: the page was not served through the edge on port $port" >&2
exit 1
