from crackscan.cli import main

raise SystemExit(main())
