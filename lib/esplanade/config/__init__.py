"""Settings of every service (`settings.py`) and how they are loaded and checked (`loading.py`)."""
