"""`moeify.distributed`: the public name of the distributed target (moeify/targets/distributed/)."""
from moeify.targets.distributed import *  # noqa: F401,F403
from moeify.targets.distributed import __all__  # noqa: F401
