"""Schema revisions, oldest first by id (0001, 0002, ...). A package so that it is installed."""
