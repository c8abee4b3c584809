"""The long-running daemon: spool intake, durable journal, supervision, shutdown."""
