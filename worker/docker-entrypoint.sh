#!/bin/sh
# Entrypoint of the mcard-tasks image.
#
#   worker [ARGS...]   the Celery worker (python -m worker), ARGS passed to it (default)
#   -OPTION ...        the worker with these options
#   flower [ARGS...]   Flower on 0.0.0.0:5555, basic auth from MCARD_FLOWER_USER/PASSWORD
#   anything else      run as given (e.g. `mcard-tasks health`, `sh`)
#
# Every branch uses exec, so the process becomes PID 1 (or tini's child with `init: true`)
# and receives SIGTERM/SIGINT directly.
set -eu

role="${1:-worker}"
if [ "$#" -gt 0 ]; then shift; fi

case "$role" in
    worker)
        exec python -m worker "$@"
        ;;
    flower)
        # Flower reads FLOWER_<OPTION> variables; this keeps the password off the command
        # line (no `ps` leak). The value is user:password (a ',' would start a second pair).
        if [ -n "${MCARD_FLOWER_USER:-}" ] && [ -n "${MCARD_FLOWER_PASSWORD:-}" ]; then
            FLOWER_BASIC_AUTH="${MCARD_FLOWER_USER}:${MCARD_FLOWER_PASSWORD}"
            export FLOWER_BASIC_AUTH
        elif [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
            echo "docker-entrypoint: WARNING: MCARD_FLOWER_USER/MCARD_FLOWER_PASSWORD not set," \
                 "Flower runs WITHOUT authentication" >&2
        fi
        exec celery -A mcard_tasks flower --address=0.0.0.0 --port=5555 "$@"
        ;;
    -*)
        # Options only (e.g. `--loglevel=DEBUG`): they are the worker's.
        exec python -m worker "$role" "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
