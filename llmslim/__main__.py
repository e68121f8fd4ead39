"""``python -m llmslim``: the command line."""

from .cli import main

raise SystemExit(main())
