"""`python -m djinn serve ...` / `python -m djinn demo ...`."""
import sys

from .cli import main

sys.exit(main())
