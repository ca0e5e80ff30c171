from memwatch.demo import main

raise SystemExit(main())
