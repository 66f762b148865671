"""Azure Blob settings: the ``az://container/prefix`` URI, the options, and where credentials come from."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ...errors import BadInputError
from ..objectstore.config import MiB, ObjectStoreConfig, parse_bucket_uri

__all__ = ["AzureConfig", "MiB", "parse_az_uri", "parse_connection_string"]

_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")


def parse_az_uri(uri: str) -> tuple[str, str]:
    """``az://container/prefix`` -> (container, prefix without slashes at either end)."""
    return parse_bucket_uri(uri, ("az",), "an Azure Blob", _CONTAINER_RE,
                            "3-63 lower-case letters, digits and single '-'", "container")


def parse_connection_string(text: str) -> dict[str, str]:
    """``Key=value;...`` -> a dict (the account key and SAS keep their ``=`` padding)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if part.strip():
            key, sep, value = part.partition("=")
            if not sep:
                raise BadInputError(f"malformed Azure connection string: segment {key!r} has no '='")
            out[key.strip()] = value.strip()
    return out


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass
class AzureConfig(ObjectStoreConfig):
    """Validated options of one `AzureBlobStorage` (see its docstring for their meaning)."""

    connection_string: str | None = None
    account_name: str | None = None
    account_key: str | None = None
    sas_token: str | None = None
    account_url: str | None = None
    endpoint_url: str | None = None  # alias of account_url (what the CLI's --endpoint-url passes)
    credential: Any = None
    read_chunk_size: int = 4 * MiB
    list_page_size: int = 5000
    container: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        uri = self.uri
        self.container, self.prefix = parse_az_uri(uri)
        self.uri = f"az://{self.container}/{self.prefix}" if self.prefix else f"az://{self.container}"
        self.check_limits(uri, read_chunk_size=self.read_chunk_size)
        if self.account_url and self.endpoint_url and self.account_url != self.endpoint_url:
            raise BadInputError(f"{uri}: give account_url or endpoint_url, not two different ones")
        self.account_url = self.account_url or self.endpoint_url

    def client_args(self) -> tuple[str | None, str | None, Any]:
        """(connection string, account URL, credential) from the options, else the usual environment.

        Order: ``connection_string=``; ``account_name=``/``account_key=``/``sas_token=``/``credential=``;
        ``AZURE_STORAGE_CONNECTION_STRING``; ``AZURE_STORAGE_ACCOUNT_NAME`` (or ``AZURE_STORAGE_ACCOUNT``) with
        ``AZURE_STORAGE_ACCOUNT_KEY`` (or ``AZURE_STORAGE_KEY``) or ``AZURE_STORAGE_SAS_TOKEN``; an account name
        alone uses azure-identity's DefaultAzureCredential when it is installed.
        """
        explicit = any((self.account_name, self.account_key, self.sas_token, self.credential))
        if self.connection_string or not explicit:
            conn = self.connection_string or (None if explicit else _env("AZURE_STORAGE_CONNECTION_STRING"))
            if conn:
                return conn, self.account_url, None
        name = self.account_name or _env("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")
        key = self.account_key or (None if self.sas_token or self.credential else _env("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY"))
        sas = self.sas_token or (None if key or self.credential else _env("AZURE_STORAGE_SAS_TOKEN"))
        if not name and not self.account_url:
            raise BadInputError(
                f"{self.uri}: no Azure account configured: set AZURE_STORAGE_CONNECTION_STRING, or "
                f"AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN), or pass "
                f"connection_string= / account_name= and account_key="
            )
        url = self.account_url or f"https://{name}.blob.core.windows.net"
        credential: Any = self.credential
        if credential is None and key:
            if not name:
                raise BadInputError(f"{self.uri}: an account key needs the account name (account_name=)")
            credential = {"account_name": name, "account_key": key}
        elif credential is None and sas:
            credential = sas.lstrip("?")
        elif credential is None:
            try:
                from azure.identity.aio import DefaultAzureCredential
            except ImportError as exc:
                raise BadInputError(
                    f"{self.uri}: no account key, SAS token or connection string for account {name!r}: set "
                    f"AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_TOKEN / AZURE_STORAGE_CONNECTION_STRING, or "
                    f"`pip install azure-identity` for Entra ID (DefaultAzureCredential)"
                ) from exc
            credential = DefaultAzureCredential()
        return None, url, credential
