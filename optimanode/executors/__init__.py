"""Executors: one per model file, and everything that keeps its worker in the state it should be in.

``registry`` (with ``gguf``) finds and reads model files; ``scanner`` turns rescans into
registrations and file changes; ``lifecycle`` holds the state table; ``effective`` computes a
model's settings over the defaults; ``reconciler`` decides (pure, the whole restart policy);
``runtime`` owns each executor's record, fires transitions through the journal and runs the
reconcile loop; ``supervisor`` runs the worker processes. Imports point down in that order
(an import-linter contract).
"""
