"""The models wing: the UNet, every checkpoint family, the Hub, the registry, run folders, export and the model boundary."""
