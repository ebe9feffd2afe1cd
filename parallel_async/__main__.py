"""``python -m parallel_async``: the ``parallel-async`` command."""

from ._cli import main

raise SystemExit(main())
