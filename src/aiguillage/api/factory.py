"""Building the app in each worker process from the config file named in the environment."""

from __future__ import annotations

import os

from aiguillage.api.app import AiguillageApp
from aiguillage.catalog.config import load_config

CONFIG_ENV = "AIGUILLAGE_CONFIG"


def app_from_env() -> AiguillageApp:
    """Uvicorn's factory: workers are separate processes and re-read the config."""
    return AiguillageApp(load_config(os.environ[CONFIG_ENV]))
