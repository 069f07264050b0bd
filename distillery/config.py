"""Where the SDK and the CLI find the server's URL and its API key, whatever folder they run from.

Precedence, first found wins, separately for the URL and the key:

1. the `--url` / `--api-key` options;
2. the `DISTILLERY_URL` / `DISTILLERY_API_KEY` environment variables;
3. the user's config file: `$DISTILLERY_CONFIG`, else `$XDG_CONFIG_HOME/distillery/config.toml`
   (`~/.config/distillery/config.toml` when XDG_CONFIG_HOME is unset), written by `distillery login`
   and by `distillery up`;
4. the local stack's files in `$DATA_DIR` (default `./.distillery`): `url` and `api_key`, written by
   `distillery up`;
5. the URL `http://127.0.0.1:8000` (no key).

Every value remembers where it came from, so an error can say which key was sent and from where.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "DISTILLERY_URL"
KEY_ENV = "DISTILLERY_API_KEY"
CONFIG_ENV = "DISTILLERY_CONFIG"
# The server lists keys by their first 11 characters (`dk_` + 8); the CLI shows the same, never more.
KEY_DISPLAY_CHARS = 11


class ConfigError(Exception):
    """The config file exists but cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Setting:
    """One resolved value and where it came from (`--url`, `DISTILLERY_URL`, `config file ...`)."""

    value: str
    source: str


@dataclass(frozen=True)
class Connection:
    """The server to talk to and the key to send."""

    url: Setting
    api_key: Setting | None

    def describe_key(self) -> str:
        """`key dk_AbCdEfGh… (from DISTILLERY_API_KEY)`, or that none was found and where the CLI looked."""
        if self.api_key is None:
            return (
                "no API key was sent: none in --api-key, $DISTILLERY_API_KEY, "
                f"{config_path()} or {local_stack_dir() / 'api_key'}"
            )
        return f"sent key {key_prefix(self.api_key.value)} (from {self.api_key.source})"


def key_prefix(key: str) -> str:
    """The first characters of a key, as `GET /admin/keys` shows them; the rest stays secret."""
    return key[:KEY_DISPLAY_CHARS] + ("…" if len(key) > KEY_DISPLAY_CHARS else "")


def config_path() -> Path:
    """The user's CLI config file (it need not exist)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "distillery" / "config.toml"


def local_stack_dir() -> Path:
    """Where `distillery up` keeps its files: $DATA_DIR, default ./.distillery (relative to the cwd)."""
    return Path(os.environ.get("DATA_DIR") or ".distillery").expanduser().absolute()


def read_config(path: Path | None = None) -> dict[str, str]:
    """The config file's `url` and `api_key` (empty when there is no file)."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return {key: str(document[key]) for key in ("url", "api_key") if isinstance(document.get(key), str)}


def write_config(*, url: str, api_key: str, path: Path | None = None) -> Path:
    """Write `url` and `api_key` to the config file (mode 0600: it holds a secret), atomically."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON strings of these characters are valid TOML basic strings.
    text = (
        "# Distillery CLI: the server and key to use (written by `distillery login` / `distillery up`).\n"
        f"url = {json.dumps(url)}\n"
        f"api_key = {json.dumps(api_key)}\n"
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    temporary.replace(path)
    return path


def _read_stripped(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None


def resolve(url: str | None = None, api_key: str | None = None) -> Connection:
    """URL and key by the precedence in this module's docstring; options as given on the command line."""
    config = read_config()
    path = config_path()
    stack = local_stack_dir()
    url_candidates = [
        (url, "--url"),
        (os.environ.get(URL_ENV), URL_ENV),
        (config.get("url"), f"config file {path}"),
        (_read_stripped(stack / "url"), str(stack / "url")),
        (DEFAULT_URL, "the default"),
    ]
    key_candidates = [
        (api_key, "--api-key"),
        (os.environ.get(KEY_ENV), KEY_ENV),
        (config.get("api_key"), f"config file {path}"),
        (_read_stripped(stack / "api_key"), str(stack / "api_key")),
    ]
    url_setting = next(Setting(v.rstrip("/"), s) for v, s in url_candidates if v)
    key_setting = next((Setting(v, s) for v, s in key_candidates if v), None)
    return Connection(url=url_setting, api_key=key_setting)
