"""The export formats, apart from export.py so that listing them needs no TensorFlow."""

FORMATS = {
    "savedmodel": "a directory; signatures serving_default (encoded image bytes) and "
                  "predict_images (uint8 pixels)",
    "keras": "one .keras file on resized pixels",
    "tflite": "one .tflite file on resized pixels (signature serving_default)",
}
