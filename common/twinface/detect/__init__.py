"""Face detection (MTCNN cascade, framework-neutral numpy) and the photo -> aligned crop pipeline.

Names only here: the command line reads them without importing OpenCV or a framework.
"""
FRAMEWORKS = ("torch", "tf", "onnx")        # runtimes of the detector nets
FACE_MODES = ("largest", "all")
DEFAULT_MIN_SCORE = 0.95
MAX_CROP_SIZE = 1024
