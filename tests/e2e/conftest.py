"""End-to-end tests: real Flower simulations (marked ``slow``) of a small federation."""

import pytest


@pytest.fixture
def small_cfg() -> dict:
    """The settings of the small federation every end-to-end test runs: 60 generated
    identities of 6 images at 48 px across 3 institutions, 2 rounds, everyone training
    every round. Tests change what they study: ``RunConfig(**{**small_cfg, ...})``."""
    return dict(synthetic_identities=60, synthetic_images=6, image_size=48, num_clients=3,
                rounds=2, batch_size=32, min_train_nodes=3)
