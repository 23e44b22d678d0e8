"""Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch.

Public API (version ``API_VERSION``; see docs/api.md): :class:`NSAConfig`, :class:`NSAAttention`
(prefill, training, decode caches), :func:`settings`, :func:`backends`, :func:`workspace_stats`,
:func:`reset_workspaces`, and :mod:`nsa.models` for training benchmarks.
"""

from .attention import NSAAttention, NSACache
from .config import NSAConfig
from .flags import Settings, SettingsError, reload_settings, settings
from .flags import override as override_settings
from .ops.workspace import reset_workspaces, workspace_stats
from .routes import backends

__version__ = "0.1.0"
API_VERSION = 1

# Read and validate the NSA_* environment now: a bad value fails at `import nsa`, naming the
# variable, not at the first forward.
settings()

__all__ = [
    "API_VERSION",
    "NSAAttention",
    "NSACache",
    "NSAConfig",
    "Settings",
    "SettingsError",
    "__version__",
    "backends",
    "override_settings",
    "reload_settings",
    "reset_workspaces",
    "settings",
    "workspace_stats",
]
