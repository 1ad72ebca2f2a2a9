"""Protected face templates: protection schemes, their evaluation and a secure store."""
