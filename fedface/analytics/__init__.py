"""Encrypted federated analytics (in progress, issue 18): the query language so far.

:mod:`.query` parses a query text or JSON into one typed spec and checks it against a site's
declared schema before any site computes.
"""
