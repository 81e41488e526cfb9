"""``python -m topofx ...``: the ``topofx`` command line (see :mod:`topofx.cli`)."""
from .cli import main

raise SystemExit(main())
