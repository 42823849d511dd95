"""Built-in mode specs (YAML files in this folder) and the Python hooks they name (`hooks/`)."""
import os

SPECS_DIR = os.path.dirname(os.path.abspath(__file__))
