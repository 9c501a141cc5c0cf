"""Raw cases to the preprocessing cache: resampling, the dataset fingerprint, preprocessing, the cache."""
