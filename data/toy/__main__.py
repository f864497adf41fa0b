"""``python -m data.toy``: write a synthetic data set."""

from data.toy import main

raise SystemExit(main())
