"""Command-line interface: one module per subcommand, each a thin call into the library."""
