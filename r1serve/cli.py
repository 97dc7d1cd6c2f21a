"""The `r1serve` command line."""
import sys
def main(argv=None):
    print("r1serve")
    return 0
