"""ssad-tune's client: ``from ssad_tune import Client`` (httpx and numpy only; the server
and the worker are the ``server`` and ``worker`` extras). See the README's "Python client"."""

from ssad_tune.client import Client, ClientError, DatasetInfo, JobInfo, describe_selection
from ssad_tune.webhooks import verify

__all__ = ["Client", "ClientError", "DatasetInfo", "JobInfo", "describe_selection", "verify"]
