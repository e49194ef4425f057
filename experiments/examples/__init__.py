"""Example apps that use fedsec as a library."""
