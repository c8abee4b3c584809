"""aep-exporter: export Adobe Experience Platform datasets to cloud storage."""

__version__ = "0.1.0"
