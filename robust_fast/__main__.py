import sys

from robust_fast.cli import main

sys.exit(main())
