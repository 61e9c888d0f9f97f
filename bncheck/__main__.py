"""`python -m bncheck` runs the same CLI as the console script."""

from bncheck.cli import console

if __name__ == "__main__":
    console()
