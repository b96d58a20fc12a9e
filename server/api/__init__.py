"""The HTTP API (Litestar): ``server.api.app.create_app`` builds the application."""
