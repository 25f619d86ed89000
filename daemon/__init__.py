"""facewatch daemon: supervisor, configuration and the command line."""
