import sys

from lrwatch.cli import main

if __name__ == "__main__":  # not when a worker process (spawn, on Windows) imports the main module
    sys.exit(main())
