import sys

from lbnode.cli import main

sys.exit(main())
