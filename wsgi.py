"""The WSGI entry point: `gunicorn wsgi:app`, `flask --app wsgi run`.

Reads `.env` from the working directory (the environment wins over it), then builds the app.
"""

from dotenv import load_dotenv

from app import create_app
from app.logs import configure_logging

load_dotenv(".env")
app = create_app()
configure_logging(app.config["SETTINGS"].log_level, app.config["SETTINGS"].secrets)
