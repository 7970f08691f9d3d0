"""Everything that talks to ``torch.distributed`` lives under this package."""
