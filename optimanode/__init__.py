"""OptimaNode: the inference node of OptimaGPT.

Start at docs/architecture.md; the package layout draws the layers:
``cli`` → ``node`` → ``executors`` → ``journal`` / ``metrics`` → ``protocol`` / ``config`` → ``errors``.
``worker`` is the child process (the only code that imports ``llama_cpp``).
"""

__version__ = "0.1.0"
