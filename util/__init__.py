"""Small single-purpose helpers shared by models, datasets and the training loop."""
