"""A plain PyTorch CNN Flower app defended by fedsec's FLAME, reply validation and activation bounds."""
