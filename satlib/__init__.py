"""satlib: the library of satbook. ``satlib.audit(model, dataset, ...)`` audits any model (Chapter 5)."""
import importlib


def __getattr__(name: str):
    """Import ``satlib.audit`` on first use, so that ``import satlib`` stays light."""
    if name == "audit":
        return importlib.import_module(".audit", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
