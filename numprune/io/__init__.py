"""Reading and writing files: checks of inputs, and one writer for every file and folder numprune saves."""
