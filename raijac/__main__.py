"""`python -m raijac` runs the CLI."""

from raijac.cli import main

if __name__ == "__main__":
    main()
