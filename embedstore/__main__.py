"""`python -m embedstore` runs the command line."""

from embedstore_cli import main

main()
