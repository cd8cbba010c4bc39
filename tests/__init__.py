"""sclref test suite."""
