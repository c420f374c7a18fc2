#!/usr/bin/env bash
# `make demo`: bring up Ember's single-node stack and show the control plane working.
# Safe to re-run: every step is idempotent. Leaves the stack running.
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER="$PWD/.venv/bin/ember"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
expect_exit() {  # expect_exit CODE WHAT -- COMMAND...
  local want=$1 what=$2; shift 3
  set +e; "$@" >/dev/null 2>/tmp/ember-demo.err; local got=$?; set -e
  printf '%-58s -> exit %s (%s)\n' "$what" "$got" "$(head -n1 /tmp/ember-demo.err)"
  [ "$got" = "$want" ] || { echo "demo: expected exit $want" >&2; exit 1; }
}

# Put `ember` on PATH for the newcomer (root on a fresh machine): a symlink, nothing else.
if [ -w /usr/local/bin ] && { [ ! -e /usr/local/bin/ember ] || [ -L /usr/local/bin/ember ]; }; then
  ln -sf "$PWD/.venv/bin/ember" /usr/local/bin/ember
fi

step "Bringing up the single-node stack (PostgreSQL, schema, API, controller, local admin)"
$EMBER dev up

step "Who am I? (the local admin's token was stored in the CLI config)"
$EMBER whoami

step "Apps: create (idempotent), list as JSON, show"
$EMBER apps create hello
$EMBER apps create hello
$EMBER envs create prod --app hello
$EMBER apps list --json
$EMBER apps show hello

step "Errors are clear and exit codes stable (docs/specs/cli.md)"
expect_exit 3 "ember apps show nope" -- $EMBER apps show nope
expect_exit 5 "ember whoami with a bad token" -- env EMBER_API_TOKEN=ember_pat_bad $EMBER whoami
expect_exit 2 "ember apps create 'Bad Name'" -- $EMBER apps create "Bad Name"

step "Build the sample apps into OCI images from Debian packages (no Docker)"
for app in hello-http hello-tls; do
  .venv/bin/python -m ember.dev.examples build "$app" --out "examples/$app/build/oci"
done

step "Validate their manifests (offline; every error would name its exact path)"
(cd examples/hello-http && $EMBER manifest validate)
(cd examples/hello-tls && $EMBER manifest validate)

step "Deploy hello-http: push the image by digest to the platform registry, release v1"
# --detach: no host agent runs on this stack yet, so the rollout cannot finish; without it
# `ember deploy` waits for the new instances to be healthy (and exits 6 if they never are).
$EMBER apps create hello-http
$EMBER envs create prod --app hello-http
(cd examples/hello-http && $EMBER deploy --image build/oci --detach)
(cd examples/hello-http && $EMBER deploy --image build/oci)   # identical: nothing new

step "A changed manifest is a new release; rollback returns to an older one"
sed 's/max_surge = 1/max_surge = 2/' examples/hello-http/ember.toml > /tmp/ember-demo-v2.toml
(cd examples/hello-http && $EMBER deploy --image build/oci --manifest /tmp/ember-demo-v2.toml --detach)
(cd examples/hello-http && $EMBER rollback)
(cd examples/hello-http && $EMBER releases)

step "Desired vs running: scale, then ask why it does not converge (no hosts yet)"
(cd examples/hello-http && $EMBER scale web=2)
sleep 1   # one controller pass
(cd examples/hello-http && $EMBER status)
$EMBER hosts list

step "Every change is an event; views are projections of the log"
$EMBER admin events streams
$EMBER admin projections status
$EMBER admin projections verify

cat <<'MSG'

Ember's single-node stack is up (API on http://127.0.0.1:7070); `ember` is on your PATH. Try:
  ember apps list                 # your apps in org 'local'
  ember tokens create --name ci --org local --app hello --capability deploy
  ember admin events tail         # follow the event log live (Ctrl-C to stop)
  ember status --app hello-http   # desired vs running, and why it is not converging
  ember dev down                  # stop it (data stays in $EMBER_HOME)
MSG
