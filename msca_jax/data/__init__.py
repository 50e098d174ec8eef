"""Input: datasets, clip sampling, augmentation and the tf.data pipeline."""
