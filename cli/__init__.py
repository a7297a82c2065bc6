"""The `evoclone` command line."""
