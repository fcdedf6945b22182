"""Serving a trained run: P5Rec (inference), the HTTP API (app), the template studio and the server helper.

The last layer: it imports the others; nothing outside it imports it (cli.py names its modules by string).
"""
