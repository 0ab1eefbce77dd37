"""rclib."""
