"""fedsec: backdoor attacks and defenses in federated prompt learning of CLIP models."""

__version__ = "0.1.0"
