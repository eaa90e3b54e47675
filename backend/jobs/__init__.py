"""Project-scale work outside /predict: pre-annotating a whole project through the Label Studio API."""
