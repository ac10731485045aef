"""``python -m seahal.bench``: the ``seahal bench`` command with every option of :func:`add_arguments`."""

import argparse
import sys

from seahal.bench import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m seahal.bench", description=__doc__)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
