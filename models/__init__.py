"""What learns: patch encoder, MoCo queues and momentum, IFM loss, augmentation, graph model,
training loop and outcome heads."""
