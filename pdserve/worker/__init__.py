"""Role daemons: ``pdserve serve`` turns a ranktable role into a running scheduler or vLLM instance.

``command`` builds an instance's vLLM command line and environment (a pure function),
``supervisor`` runs it as a child with signal forwarding and a log ring buffer, ``middleware``
is the identity endpoint loaded into vLLM's server, ``cli`` wires them to the command line.
"""
