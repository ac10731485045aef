import sys

from seahal.cli import main

sys.exit(main())
