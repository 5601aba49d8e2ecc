"""System tests: the node and its worker processes, signals, TLS over loopback, install, wheel, service."""
