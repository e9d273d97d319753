"""Offline data preparation: pixel shards (make_shards) and VAE latent shards (encode_latents)."""
