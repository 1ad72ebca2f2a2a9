"""Homomorphic encryption for fedface: BFV contexts, the key ceremony, packing, envelopes.

- :mod:`crypto.context`: :class:`HEParams`, :class:`HEContext` (SEAL via TenSEAL).
- :mod:`crypto.keys`: the ceremony (``init_keys``, ``rotate_keys``) and the bundles.
- :mod:`crypto.signing`: Ed25519 signatures, one private key per institution and server.
- :mod:`crypto.packing`: clip, stochastic quantization, several values per slot.
- :mod:`crypto.envelope`: the versioned, authenticated envelope on the wire.
- :mod:`crypto.update`: encrypt a model update / decrypt an aggregate (the one path
  clients use).
"""

from crypto.context import BadCiphertext, HEContext, HEParams, MissingSecretKey
from crypto.envelope import Envelope, EnvelopeError, open_envelope, seal_envelope
from crypto.keys import (
    ClientKeys,
    KeyBundleError,
    ServerKeys,
    describe_keys,
    handout,
    init_keys,
    institution_dir,
    load_client_keys,
    load_server_keys,
    rotate_keys,
)
from crypto.packing import Layout, make_layout

__all__ = [
    "BadCiphertext", "ClientKeys", "Envelope", "EnvelopeError", "HEContext", "HEParams",
    "KeyBundleError", "Layout", "MissingSecretKey", "ServerKeys", "describe_keys", "handout",
    "init_keys", "institution_dir", "load_client_keys", "load_server_keys", "make_layout", "open_envelope",
    "rotate_keys", "seal_envelope",
]
