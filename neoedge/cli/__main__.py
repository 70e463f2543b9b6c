"""`python -m neoedge.cli`: the same as the `neoedge` command."""

from . import main

main()
