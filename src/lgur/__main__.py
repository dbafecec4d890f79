import sys

from lgur.cli import main

sys.exit(main())
