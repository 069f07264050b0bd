"""The CLI's view of the server and key: the SDK's resolution (distillery/config.py), re-exported."""

from distillery.config import (
    CONFIG_ENV,
    DEFAULT_URL,
    KEY_DISPLAY_CHARS,
    KEY_ENV,
    URL_ENV,
    ConfigError,
    Connection,
    Setting,
    config_path,
    key_prefix,
    local_stack_dir,
    read_config,
    resolve,
    write_config,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_URL",
    "KEY_DISPLAY_CHARS",
    "KEY_ENV",
    "URL_ENV",
    "ConfigError",
    "Connection",
    "Setting",
    "config_path",
    "key_prefix",
    "local_stack_dir",
    "read_config",
    "resolve",
    "write_config",
]
