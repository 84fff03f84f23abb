from evoray.cli import main

raise SystemExit(main())
