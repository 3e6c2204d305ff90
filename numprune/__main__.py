from numprune.cli import main

raise SystemExit(main())
