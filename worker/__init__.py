"""The deployment folder of the worker (Dockerfile, entrypoint); not an installed package.

``python -m worker`` from a checkout runs ``mcard_tasks.worker``, like ``mcard-tasks worker``.
"""
