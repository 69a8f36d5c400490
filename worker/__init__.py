"""The mcard-tasks worker process (``python -m worker``)."""
