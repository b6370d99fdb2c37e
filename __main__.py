"""`python -m epserve`: the same command line as `epserve` (cli.py)."""
from epserve.cli import main

raise SystemExit(main())
