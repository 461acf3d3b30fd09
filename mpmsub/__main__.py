"""`python -m mpmsub`: the command line."""

from mpmsub._cli.main import entry

if __name__ == "__main__":
    entry()
