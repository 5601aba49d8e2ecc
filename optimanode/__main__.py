import sys

from optimanode.cli import main

sys.exit(main())
