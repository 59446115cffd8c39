from streambus.cli import main

raise SystemExit(main())
