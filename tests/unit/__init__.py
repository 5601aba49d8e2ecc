"""Unit tests: pure code, no model file, no child process, no network; fast."""
