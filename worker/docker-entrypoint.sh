#!/bin/sh
# Entrypoint of the mcard-tasks image.
#
#   worker [ARGS...]   the Celery worker (mcard-tasks worker), ARGS passed to it (default)
#   -OPTION ...        the worker with these options
#   flower [ARGS...]   Flower on 0.0.0.0:5555 (every interface of the container), basic auth
#                      from MCARD_FLOWER_USER/PASSWORD: without them Flower refuses to start
#   anything else      run as given (e.g. `mcard-tasks health`, `sh`)
#
# Every branch uses exec, so the process becomes PID 1 (or tini's child with `init: true`)
# and receives SIGTERM/SIGINT directly.
set -eu

role="${1:-worker}"
if [ "$#" -gt 0 ]; then shift; fi

case "$role" in
    worker)
        exec mcard-tasks worker "$@"
        ;;
    flower)
        # The app maps MCARD_FLOWER_USER/PASSWORD to Flower's basic auth (FLOWER_BASIC_AUTH,
        # kept off the command line), makes Flower read-only, shows a rejection as
        # "REJECTED: <reason>" instead of SUCCESS (format_task), and refuses (exit 2) to serve
        # 0.0.0.0 without credentials or with unusable ones; see mcard_tasks/flower.py. The
        # broker URL comes from MCARD_BROKER_URL, never the command line.
        exec celery -A mcard_tasks flower --address=0.0.0.0 --port=5555 "$@"
        ;;
    -*)
        # Options only (e.g. `--loglevel=DEBUG`): they are the worker's.
        exec mcard-tasks worker "$role" "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
