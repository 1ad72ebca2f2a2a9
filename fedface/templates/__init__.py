"""Protected face templates: enrol, verify and identify without storing an embedding.

- :mod:`~fedface.templates.schemes`: the scheme interface, template header, registry;
- :mod:`~fedface.templates.cancelable`: BioHashing and the keyed orthonormal projection
  (tokens: :mod:`crypto.tokens`);
- :mod:`~fedface.templates.encrypted`: CKKS-encrypted templates and the encrypted 1:N
  gallery (cryptography: :mod:`crypto.match`);
- :mod:`~fedface.templates.store`: the SQLAlchemy store (SQLite, PostgreSQL), sealed rows;
- :mod:`~fedface.templates.service`: enrol, verify, identify, revoke, renew;
- :mod:`~fedface.templates.embed`: embeddings from images (dlib or a fedface model) or
  ``.npy`` files;
- :mod:`~fedface.templates.evaluate`, :mod:`~fedface.templates.bench`,
  :mod:`~fedface.templates.he_bench`: the ISO/IEC 30136 figures of
  ``fedface bench templates``.
"""
