"""``python -m mcard_tasks.cli``: the same as the ``mcard-tasks`` command."""

from mcard_tasks.cli import main

main()
