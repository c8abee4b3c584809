"""Operating the daemon: the admin server, systemd, the probe."""
