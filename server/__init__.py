"""fedface server side: the ServerApp, the round loop, the strategies' round lifecycle,
reply screening, aggregation strategies (plaintext and encrypted) and checkpoints."""
