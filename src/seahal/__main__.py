import sys

from seahal.cli import main

if __name__ == "__main__":
    sys.exit(main())
