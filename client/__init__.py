"""fedface client side: the ClientApp (:mod:`client.app`: plain local training and
scoring), the mods that wrap it (:mod:`client.mods`: encryption, client-side central DP,
DP releases, typed error replies), and its task, privacy and encryption helpers."""
