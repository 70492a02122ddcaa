"""Alembic environment of the ledger, shipped inside the package (run by `Ledger.open`)."""
