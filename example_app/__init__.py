"""The wsession example app: a Starlette app whose sessions you can watch and reach."""

from .app import app, create_app

__all__ = ["app", "create_app"]
