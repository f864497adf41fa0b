"""``python -m data.toy``: write a synthetic data set (see ``data.toy.cli``)."""

from data.toy.cli import main

raise SystemExit(main())
