"""Integrations with other libraries; each submodule imports its library, this package none."""
