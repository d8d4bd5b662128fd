"""`python -m moeify.cli`: the same as the `moeify` console script."""
import sys

from . import main

sys.exit(main())
