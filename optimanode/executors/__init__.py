"""Executors: one per model file.

``registry`` finds and reads model files; ``lifecycle`` holds the state table; ``reconciler``
decides what to do (pure) and ``supervisor`` runs the worker processes that do it.
"""
