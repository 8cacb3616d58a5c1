"""The OCI distribution protocol as both sides speak it: the error codes and bodies of
the spec (``errors``) and the client that pushes and pulls (``client``). Below the sinks
and the runtime (which push and pull) and the registry face (which serves the same
errors), so none of them imports another."""
