import sys

from causalscan.cli import main

sys.exit(main())
