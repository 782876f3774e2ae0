"""`python -m peerdaemon` = the `peerdaemon` command."""

from peerdaemon.cli import main

raise SystemExit(main())
