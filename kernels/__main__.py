"""``python -m romav2_plugin.kernels --check``: compile every kernel source through NVRTC, and every run-time
specialisation of the local-correlation forward for the shipped architectures (channels and radius as
compile-time constants, :func:`romav2_plugin.kernels.specialisations`).

Works without a GPU (NVRTC only). For each source and architecture it prints the image kind and size and the
entry points found in it; the exit status is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys


def _check(archs: list[str], use_cache: bool) -> int:
    from romav2_plugin import kernels

    try:
        ver = kernels.nvrtc_version()
    except ImportError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 2
    print(f"NVRTC {ver[0]}.{ver[1]}; cache: {kernels.cache_dir() if use_cache else 'disabled'}")
    failures = 0
    jobs = [(source, (), entries) for source, entries in kernels.KERNELS.items()]
    # the run-time specialisations of the local-correlation forward (channels, radius as constants)
    jobs += [("local_corr.cu", kernels.spec_defines(c, r), kernels.spec_entries(c))
             for c, r in kernels.specialisations()]
    for source, defines, entries in jobs:
        label = source + (f" {' '.join(defines)}" if defines else "")
        for arch in archs:
            try:
                ck = kernels.compile_kernel(source, arch, use_cache=use_cache, defines=defines)
            except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                failures += 1
                print(f"FAIL {label} [{arch}]: {exc}", file=sys.stderr)
                continue
            missing = [e for e in entries if e.encode() not in ck.image]
            status = "ok" if not missing else f"MISSING {missing}"
            failures += bool(missing)
            cached = " (cached)" if ck.from_cache else ""
            print(f"{label} [{arch}] {ck.kind} {len(ck.image)} bytes{cached}: {status}, {len(entries)} entry points")
            if not defines:
                for e in entries:
                    print(f"    {e}")
            if ck.log:
                print("    nvrtc log: " + ck.log.replace("\n", "\n    "))
    print("all kernels compiled" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m romav2_plugin.kernels", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compile every kernel for the given archs")
    parser.add_argument("--arch", action="append", help="NVRTC target(s), default sm_80 and sm_90")
    parser.add_argument("--no-cache", action="store_true", help="always recompile, do not touch the cache")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 0
    return _check(args.arch or ["sm_80", "sm_90"], use_cache=not args.no_cache)


if __name__ == "__main__":
    sys.exit(main())
