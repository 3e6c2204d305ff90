"""Writing outputs: one writer for every file and folder numprune saves."""
