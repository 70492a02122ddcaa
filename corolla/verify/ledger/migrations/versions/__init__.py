"""The ledger's schema revisions, oldest first; each spells out its own DDL."""
