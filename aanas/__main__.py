"""`python -m aanas` (also the entry point torchrun uses: `torchrun -m aanas train ...`)."""

from aanas.cli import main

raise SystemExit(main())
