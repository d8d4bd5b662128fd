"""`torchrun -m moeify.run DIR`: the launch name of the distributed target's entry point."""
from moeify.targets.distributed.entry import main

if __name__ == "__main__":
    main()
