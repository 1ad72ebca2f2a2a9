"""Deployment across hospitals: a real Flower SuperLink and SuperNodes with TLS and node
authentication.

- :mod:`fedface.deploy.provision`: ``fedface deploy init`` (CA, SuperLink certificate,
  node key pairs, HE bundles, per-recipient folders) and ``fedface deploy show``;
- :mod:`fedface.deploy.checks`: what a node checks before it connects;
- :mod:`fedface.deploy.launch`: the Flower command lines, the pre-flight check of the
  SuperLink's address, node registration;
- :mod:`fedface.deploy.processes`: starting and stopping such processes by PID (tests,
  benchmarks);
- :mod:`fedface.deploy.bench`: ``fedface bench deploy``.

The cryptography (X.509, node keys) is in :mod:`crypto.pki`.
"""
