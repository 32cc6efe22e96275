from stagediff.cli import main

raise SystemExit(main())
