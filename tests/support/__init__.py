"""Labs and scripted servers the tests use: Postfix, Exim, systemd, podman, namespaces, faults."""
