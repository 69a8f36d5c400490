"""``python -m worker`` from a checkout: the same as ``mcard-tasks worker``."""

from mcard_tasks.worker import main

main()
