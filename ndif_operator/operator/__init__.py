"""The Kopf operator: the only code that talks to the Kubernetes API.

`run_operator(OperatorSettings())` runs it; `ndif-operator run` is the command. Pure parts
(inventory, status, requests, events) are separate modules and unit-tested without a server.
"""
