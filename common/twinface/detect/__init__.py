"""Face detection (MTCNN cascade, framework-neutral numpy) and the photo -> aligned crop pipeline."""
