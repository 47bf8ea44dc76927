"""Registry access: image references, the async HTTP client, auth, hosts and mirrors."""
