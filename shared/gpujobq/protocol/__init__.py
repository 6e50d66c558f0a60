"""Types shared by the controller and the agents: job states, wire messages, files people edit.

Imports nothing but msgspec and PyYAML, and never the controller or the agent.
"""
