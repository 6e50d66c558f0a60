"""gpujobq agent: one per GPU host; runs what the controller sends and reports what it sees."""
