from epserve.cli import main

raise SystemExit(main())
