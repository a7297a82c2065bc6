"""The hospital's site node: ingest, anonymize, store, export training snapshots."""
