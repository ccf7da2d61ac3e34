from esp_core.sim.cli import main

raise SystemExit(main())
