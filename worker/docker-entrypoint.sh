#!/bin/sh
# Entrypoint of the mcard-tasks image.
#
#   worker [ARGS...]   the Celery worker (mcard-tasks worker), ARGS passed to it (default)
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
        exec mcard-tasks worker "$@"
        ;;
    flower)
        # The app maps MCARD_FLOWER_USER/PASSWORD to Flower's basic auth (FLOWER_BASIC_AUTH,
        # kept off the command line) and makes Flower read-only; see mcard_tasks/flower.py.
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
