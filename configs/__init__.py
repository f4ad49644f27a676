"""Recipe files: `get_config(arg) -> ml_collections.ConfigDict`; shared pieces in common.py."""
