"""Key ceremonies shared by the crypto tests: each module sets ``N``, its institutions."""

import pytest

from crypto.keys import init_keys, load_client_keys


@pytest.fixture(scope="module")
def ceremony(request, tmp_path_factory):
    """A key ceremony of the test module's ``N`` institutions (module scope)."""
    folder = tmp_path_factory.mktemp("he") / "keys"
    init_keys(folder, clients=request.module.N)
    return folder


@pytest.fixture(scope="module")
def clients(request, ceremony):
    """Every institution's keys of :func:`ceremony`."""
    return [load_client_keys(ceremony, k) for k in range(request.module.N)]
