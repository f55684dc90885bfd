"""Deployments. ``service`` holds the life cycle (load, compile or cache load, warm-up, generate, the
web app) as plain Python; ``modal_app`` wraps it in a Modal class; ``client`` streams from it."""
