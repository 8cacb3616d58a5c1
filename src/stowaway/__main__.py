"""`python -m stowaway` runs the CLI."""

from stowaway.cli import main

main()
