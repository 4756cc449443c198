"""Attack programs, one module per escape class; each function is one attack inside a trace.

They are real source files because nnsight ships the `with` block's source. Every attack
targets `TARGET` (a path that must never appear) and the fake secret in the environment.
"""

TARGET = "/tmp/ndif-sandbox-attack/pwned"
PROMPT = "The Eiffel Tower is in the city of"
