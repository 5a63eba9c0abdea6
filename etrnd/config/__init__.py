"""Configuration: the YAML schema, single values, secrets, and loading it for a command."""
