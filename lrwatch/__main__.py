import sys

from lrwatch.cli import main

sys.exit(main())
