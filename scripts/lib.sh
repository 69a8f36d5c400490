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

# mask_urls: print MCARD_BROKER_URL (one URL, or several separated by ';') with every
# password replaced by ****. URLs travel in the environment, never on a command line: a
# command line is in every user's process list (ps, /proc/<pid>/cmdline).
mask_urls() {
    "$PY" - <<'PY'
import os
from kombu.utils.url import maybe_sanitize_url
urls = os.environ.get("MCARD_BROKER_URL", "").split(";")
print(";".join(maybe_sanitize_url(url, mask="****") for url in urls))
PY
}

# broker_answers: exit 0 when the broker of MCARD_BROKER_URL (its first URL) accepts a
# connection within 5 s; the reason otherwise, on stderr, without the password.
broker_answers() {
    "$PY" - <<'PY'
import os, sys
from kombu import Connection
url = os.environ["MCARD_BROKER_URL"].split(";")[0]
try:
    with Connection(url, connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
except Exception as exc:  # reported by the caller
    password = Connection(url).password
    reason = str(exc).replace(password, "****") if password else str(exc)
    print(f"    {reason}", file=sys.stderr)
    sys.exit(1)
PY
}
