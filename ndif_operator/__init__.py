"""ndif-operator: NDIF's deep-inference fabric as a Kubernetes operator.

Importing this package is cheap and pulls in no ML stack (torch, ray, nnsight, transformers) and
no Kubernetes client: `ndif_operator.api` is shared with the runtime. A test checks both.
"""

__version__ = "0.1.0"
