"""gpujobq controller: the HTTP API, the queue, and the links to the agents."""
