"""The Gateway link: how a Gateway reaches this node (docs/protocol.md).

* ``tls``       the certificate (from settings, or generated and kept under <state_dir>/tls/),
                its SHA-256 fingerprint that Gateways pin, and the server TLS context.
* ``keys``      the access key file (32 random bytes as hex, mode 0600), ``keygen`` with the
                previous key kept for rotation, and the ``KeyRing`` a handshake checks against.
* ``handshake`` the mutual HMAC challenge-response (re-exported from ``optimanode.link``), and
                the per-address failure limiter.
* ``server``    ``GatewayServer``: the TCP listener, per-connection TLS after the lockout check,
                ``NodeConnection`` (the node's asyncio adapter of the link core) with the
                handshake's deadlines and close codes, one ``Session`` per authenticated Gateway.
* ``session``   frames in, Node calls, frames out: inference streams multiplexed by id, cancel,
                control calls, metrics pushes; everything the Gateway started ends when it goes.

The WebSocket mechanics and the handshake's arithmetic and state are ``optimanode.link``, the link
core the Gateway side (``optimanode.client``) drives too; the client does not import this package.
"""
