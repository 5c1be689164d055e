import sys

from pertoken.cli import main

sys.exit(main())
