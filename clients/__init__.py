"""fedsec's Flower ClientApp (benign and malicious clients)."""
