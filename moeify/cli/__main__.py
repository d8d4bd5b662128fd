"""`python -m moeify.cli`: the same as the `moeify` console script."""
import sys

from moeify.cli import main

sys.exit(main())
