"""The DCLS versions (dcls 0.1.1's names) and which of them learn a width SIG; written once."""
VERSIONS = ("v0", "v1", "max", "gauss")
SIG_VERSIONS = ("max", "gauss")


def check_version(version: str, owner: str = "") -> None:
    """ValueError naming ``version``, the accepted names and the value got (``owner``: a prefix
    such as the module's class name)."""
    if not isinstance(version, str) or version not in VERSIONS:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}version must be one of {VERSIONS}, got {version!r}")
