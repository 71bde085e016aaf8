"""The DCLS versions (dcls 0.1.1's names) and which of them learn a width SIG; written once."""
VERSIONS = ("v0", "v1", "max", "gauss")
SIG_VERSIONS = ("max", "gauss")


def check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
