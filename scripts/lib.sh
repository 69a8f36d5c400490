# Shared by scripts/run and scripts/test: the project's own virtualenv, and service checks.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MCARD_VENV:-$ROOT/.venv}
PY=$VENV/bin/python

ensure_venv() {
    local stamp=$VENV/.mcard-installed
    if [ ! -x "$PY" ]; then
        echo "==> creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "==> installing mcard-tasks and its dependencies into $VENV"
        "$PY" -m pip install --quiet --upgrade pip
        "$PY" -m pip install --quiet -e "$ROOT[dev]"
        touch "$stamp"
    fi
}

# broker_answers URL: exit 0 when an AMQP broker accepts a connection within 5 s.
broker_answers() {
    "$PY" - "$1" <<'PY'
import sys
from kombu import Connection
try:
    with Connection(sys.argv[1].split(";")[0], connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
except Exception as exc:  # reported by the caller
    print(f"    {exc}", file=sys.stderr)
    sys.exit(1)
PY
}
