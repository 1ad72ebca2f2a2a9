"""fedface server side: the ServerApp, the round loop and aggregation strategies."""
