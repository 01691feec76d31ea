"""`python -m dispatcher.cli`: the `dispatcher` command."""

from dispatcher.cli import main

main()
