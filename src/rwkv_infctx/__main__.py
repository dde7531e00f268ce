from rwkv_infctx.cli import main

raise SystemExit(main())
