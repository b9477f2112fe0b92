"""The uploader: imports only eidetic.core and its own libraries, so a lab PC installs it alone."""
