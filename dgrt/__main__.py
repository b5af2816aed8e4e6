import sys

from dgrt.cli import main

sys.exit(main())
