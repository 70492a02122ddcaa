"""`python -m corolla ...` is the same as the `platform` command."""

from corolla.platform.cli import main

raise SystemExit(main())
