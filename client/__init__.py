"""fedface client side: the ClientApp and its local training task."""
