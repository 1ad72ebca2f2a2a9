"""fedface: privacy-preserving federated learning for face recognition."""

__version__ = "0.1.0"
