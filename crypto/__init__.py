"""Homomorphic-encryption building blocks (TenSEAL contexts, keys, packing, envelopes).

Filled by the encrypted-aggregation capability; the package exists so that the
distribution installs its four import packages from the start.
"""
