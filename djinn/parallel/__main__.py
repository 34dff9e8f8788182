"""A tensor-parallel rank other than 0, started by djinn.parallel.group.start."""
import sys

from .group import rank_main

rank_main(sys.argv[1:])
