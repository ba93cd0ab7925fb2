"""Optional integrations, each imported only when used and installed by its own extra."""
