"""Settings, the embedded nats-server, the launcher and the ``audience`` command."""
