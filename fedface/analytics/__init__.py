"""Encrypted federated analytics (in progress, issue 18).

:mod:`.query` parses a query text or JSON into one typed spec and checks it against a site's
declared schema before any site computes; :mod:`.local` opens a site's CSV or SQLite table
through SQLAlchemy and computes the query's exact local figures (counts, sums, sums of
squares, histogram bins) in SQLite, and the released statistics from summed figures;
:mod:`.vector` lays every site's figures out in one integer vector (fixed point for real
sums) so that the vectors of all sites add up to the union's.
"""
