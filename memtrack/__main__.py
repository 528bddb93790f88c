from memtrack.cli.main import main

raise SystemExit(main())
