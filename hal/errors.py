"""Exceptions raised at the HAL boundary; each message says what was expected and what came."""


class SeahalError(Exception):
    """Base class of every error seahal raises on purpose."""


class SpecError(SeahalError, ValueError):
    """An operator argument violates its contract (shape, dtype, device, layout or value)."""


class DeviceError(SeahalError, RuntimeError):
    """A device name is unknown, or names a device whose backend is not available here."""


class PlanError(SeahalError, RuntimeError):
    """No kernel could be bound for an op under the requested policy."""


class RegistryError(SeahalError, RuntimeError):
    """A backend or kernel registration is malformed or conflicts with an existing one."""
