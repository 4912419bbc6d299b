"""The WSGI entry point: `gunicorn wsgi:app`, `flask --app wsgi run`.

Reads `.env` from the working directory (the environment wins over it), then builds the app.
"""

from dotenv import load_dotenv

from app import Settings, create_app
from app.embedded import keep_environment_private
from app.logs import configure_logging

keep_environment_private()  # the key and token stay out of /proc/<pid>/environ
load_dotenv(".env")
settings = Settings.from_environment()
configure_logging(settings.log_level, settings.secrets)
app = create_app(settings)
