#!/usr/bin/env bash
# `make demo`: bring up Ember's single-node stack and show the control plane working.
# Safe to re-run: every step is idempotent. Leaves the stack running.
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER=.venv/bin/ember

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Bringing up the single-node stack (embedded PostgreSQL, schema, projections)"
$EMBER dev up

step "The event log: every change is an event (stream, version, commit-safe cursor)"
$EMBER admin events list --limit 20

step "A projected view built from the log: one row per stream"
$EMBER admin events streams

step "Projections and how far behind the log they are"
$EMBER admin projections status

step "Views are rebuildable: replay the log from zero and compare (changes nothing)"
$EMBER admin projections verify

step "Scriptable: the same data as JSON, with stable exit codes"
$EMBER dev status --json
set +e
$EMBER admin events list --after not-a-cursor >/dev/null 2>&1
echo "ember admin events list --after not-a-cursor  -> exit $? (2 = usage/validation error)"
set -e

cat <<'MSG'

Ember's single-node stack is up. Try:
  .venv/bin/ember admin events tail        # follow the event log live (Ctrl-C to stop)
  .venv/bin/ember dev up                   # idempotent: appends another stack.started
  .venv/bin/ember dev down                 # stop it (data stays in $EMBER_HOME)
MSG
