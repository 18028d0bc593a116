"""HTTP routes, one module per concern; :func:`server.app.create_app` includes their routers."""

from server.routes import admin, health, labels, models, oip, predict, versions

ROUTERS = [predict.router, labels.router, admin.router, models.router, versions.router, health.router, oip.router]
