"""The gpujobq client: the `gpujobq` command and a small typed Python client of the API.

    from gpujobq.client import Client

    with Client("http://127.0.0.1:8001", token) as c:
        job = c.submit(open("solution.py", "rb").read(), open("config.yaml", "rb").read())
        for event in c.logs(job["job_id"], follow=True):
            print(event.event, event.json())

Imports neither the controller nor the agent.
"""

from gpujobq.client.api import ApiError, BadAnswer, Client, ClientError, Unreachable

__all__ = ["ApiError", "BadAnswer", "Client", "ClientError", "Unreachable"]
