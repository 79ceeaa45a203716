#!/usr/bin/env python3
"""`python submit.py infer|finetune|gather|status|logs|cancel|resume|list ...`: see README.md."""

import sys
from pathlib import Path

# Run from a fresh clone without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

try:
    from llmbatch.cli import main  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while starting: one line, as everywhere else (llmbatch.cli.main)
    print("llmbatch: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
