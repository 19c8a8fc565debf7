"""The training stages: autoencoder, latent cache, diffusion UNet and ControlNet, on one shared loop."""
