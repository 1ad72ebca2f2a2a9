"""``python -m fedface.cli``: the ``fedface`` script."""

from fedface.cli.app import main

main()
