"""`python -m etrnd` is the same program as the `etrnd` command."""

from etrnd.cli import main

raise SystemExit(main())
