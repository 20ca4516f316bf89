"""The export formats, apart from exporting.py so that listing them needs no TensorFlow."""

FORMATS = {
    "savedmodel": "the folder is a SavedModel; signatures serving_default (encoded image "
                  "bytes) and predict_images (uint8 pixels)",
    "keras": "model.keras on resized pixels; loads in plain Keras",
    "tflite": "model.tflite on resized pixels (signature serving_default)",
}

# the model inside OUT/ ("." : the SavedModel is the folder itself)
MODEL_FILES = {"savedmodel": ".", "keras": "model.keras", "tflite": "model.tflite"}
