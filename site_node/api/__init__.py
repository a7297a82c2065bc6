"""The site node's HTTP API (`evoclone site serve`)."""
