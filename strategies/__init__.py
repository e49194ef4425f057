"""fedsec's Flower strategies: the ServerApp, the strategy registry and the defenses."""
