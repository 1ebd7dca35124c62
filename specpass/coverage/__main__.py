"""``python -m specpass.coverage``: the same as ``specpass coverage``."""

import argparse
import sys

from specpass.coverage import COMMAND, add_arguments, run_coverage

parser = argparse.ArgumentParser(prog=COMMAND)
add_arguments(parser)
sys.exit(run_coverage(parser.parse_args()))
