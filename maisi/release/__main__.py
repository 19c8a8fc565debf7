"""``python -m maisi.release``: list, diff and verify releases."""

from maisi.release.cli import main

raise SystemExit(main())
