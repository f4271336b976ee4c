"""Training recipe of the shipped digits demo model (not part of the installed library)."""
