"""Find kernel headers for bcc's run-time compile, and say which tree was used."""

from __future__ import annotations

import glob
import os
import platform
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from bpfprof.collector.errors import SetupError

HEADERS_FIX = (
    "install kernel headers: apt-get install linux-headers-$(uname -r) "
    "(or linux-headers-amd64 as a stand-in), or set BCC_KERNEL_SOURCE"
)

# Generated headers that a Debian-style arch tree (linux-headers-X-amd64) holds apart
# from the shared tree (linux-headers-X-common), relative to the arch tree.
_GENERATED_INCLUDES = (
    "arch/x86/include/generated",
    "include",
    "arch/x86/include/generated/uapi",
    "include/generated/uapi",
)


@dataclass(frozen=True)
class KernelHeaders:
    source: Optional[str]  # what bcc compiles against; None: bcc's own default
    cflags: Tuple[str, ...]  # extra -I for a split tree
    description: str  # what `check` and the logs say was used
    build: str = ""  # the tree with the generated (configured) headers; == source unless split


def _is_complete(tree: str) -> bool:
    return os.path.isfile(os.path.join(tree, "include/linux/kconfig.h"))


def _has_generated(tree: str) -> bool:
    return os.path.isfile(os.path.join(tree, "include/generated/autoconf.h"))


def _version_key(path: str) -> List[int]:
    return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]


def _installed_tree(src_root: str) -> Optional[KernelHeaders]:
    """The newest linux-headers-* tree under src_root that has generated headers."""
    arch_trees = [t for t in glob.glob(os.path.join(src_root, "linux-headers-*")) if _has_generated(t)]
    for tree in sorted(arch_trees, key=_version_key, reverse=True):
        if _is_complete(tree):
            return KernelHeaders(tree, (), f"{tree} (stand-in for {platform.release()})", tree)
        common = re.sub(r"-[^-]+$", "-common", tree)
        if common != tree and _is_complete(common):
            includes = tuple(f"-I{os.path.join(tree, d)}" for d in _GENERATED_INCLUDES)
            return KernelHeaders(
                common, includes, f"{common} + {os.path.basename(tree)} (stand-in for {platform.release()})", tree
            )
    return None


def find_kernel_headers(release: Optional[str] = None, src_root: str = "/usr/src") -> KernelHeaders:
    """Headers in the order the design names; raises SetupError with the fix if none."""
    release = release or platform.release()
    build = f"/lib/modules/{release}/build"
    if os.path.isdir(build) and _has_generated(build):
        return KernelHeaders(None, (), build, build)
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if not os.path.isdir(env):
            raise SetupError(f"BCC_KERNEL_SOURCE={env} is not a directory; {HEADERS_FIX}")
        return KernelHeaders(env, (), f"{env} (BCC_KERNEL_SOURCE)", env)
    found = _installed_tree(src_root)
    if found is None:
        raise SetupError(f"no kernel headers for {release}; {HEADERS_FIX}")
    return found
