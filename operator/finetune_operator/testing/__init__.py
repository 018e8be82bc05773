"""Test doubles for the operator, in the spirit of `kopf.testing`: not part of its runtime.

- `finetune_operator.testing.kube_emulator`: a Kubernetes API server emulator on loopback
  (kmock underneath), the operator in a thread, and a client that plays kubectl and the
  training operator. Its docstring lists which API semantics it implements and which not.
- `finetune_operator.testing.fixtures`: a pytest plugin with the fixtures `emulator`,
  `cluster` and `operator` (`pytest_plugins = ["finetune_operator.testing.fixtures"]`).

Both need the `dev` extra (kmock, pytest). Nothing here is imported by the operator's own
modules, and this `__init__` imports nothing, so `import finetune_operator.testing` is free.
"""
