"""rfclip Label Studio ML backend: pre-annotates images with RF-CLIP brush and polygon masks.

`backend.app.create_app(settings)` builds the Flask app; `rfclip-backend serve` runs it under
gunicorn. Settings come from the environment once, in `backend.settings.Settings.from_env`.
"""
