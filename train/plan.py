"""`flaxpod plan CONFIG.yaml [key.sub=value ...] --target TARGET [--hbm BYTES] [--json]`.

Compiles the config's real train step for a TPU slice or GPU hosts without running it (nothing is
allocated, no accelerator needed) and says whether it fits, how much memory each device needs and
where it goes, and what a step would cost. Exit 0 when it fits, 5 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from flaxpod.sharding.launch import DEVICE_COUNT_FLAG


def parse_bytes(text: str) -> int:
    """`17179869184`, `16GiB`, `16G` (GiB) or `80GB` (10^9)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected bytes such as 17179869184, 16GiB or 80GB, got {text!r}")
    scale = {None: 1, "gib": 1024**3, "g": 1024**3, "gb": 10**9, "mib": 1024**2, "m": 1024**2, "mb": 10**6}
    return int(float(match.group(1)) * scale[match.group(2)])


def cpu_devices_forced() -> int:
    """Fake CPU devices this process's JAX will have (the count is fixed when JAX starts)."""
    match = re.search(DEVICE_COUNT_FLAG + r"=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def plan_in_child(argv: list[str], devices: int):
    """The same command in a fresh process started with `devices` fake CPU devices; its Plan."""
    from flaxpod.model.errors import FlaxpodError
    from flaxpod.train.planner import EXIT_DOES_NOT_FIT, Plan

    flags = re.sub(DEVICE_COUNT_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "XLA_FLAGS": f"{flags} {DEVICE_COUNT_FLAG}={devices}".strip(), "JAX_PLATFORMS": "cpu"}
    argv = [a for a in argv if a != "--json"] + ["--json"]
    child = subprocess.run(
        [sys.executable, "-m", "flaxpod.train.plan", *argv], env=env, capture_output=True, text=True, check=False
    )
    if child.returncode not in (0, EXIT_DOES_NOT_FIT):
        sys.stderr.write(child.stderr)
        error = FlaxpodError(f"planning on {devices} CPU devices failed (exit {child.returncode}); see above")
        error.exit_code = child.returncode
        raise error
    return Plan(**json.loads(child.stdout))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="flaxpod plan",
        description="Compile a config's train step for a target and check that it fits, without running it.",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/llama_8b.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.remat=full")
    parser.add_argument(
        "--target",
        required=True,
        help="v5p-128, v5e-256 (= v5litepod-256), v4-64, v6e-256, v5p:4x4x12, h100x8, h200x8, 2xh200x8 (2 hosts)",
    )
    parser.add_argument("--hbm", type=parse_bytes, help="memory per device to fit in (default: the chip's HBM)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = parser.parse_args(argv)
    # Compiling for a TPU needs only libtpu's description of it; JAX itself runs on the CPU here
    # (and does not try to start a TPU runtime that this host does not have).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from flaxpod.train.cli import run_guarded
    from flaxpod.train.config import load_config
    from flaxpod.train.planner import EXIT_DOES_NOT_FIT, plan, render
    from flaxpod.train.targets import parse_target

    verdict = {}

    def job() -> None:
        target = parse_target(args.target)
        if target.platform == "cpu" and cpu_devices_forced() < target.chips:
            report = plan_in_child(argv, target.chips)
        else:
            report = plan(load_config(args.config, args.overrides), target, args.hbm)
        print(json.dumps(report.to_json()) if args.json else render(report), flush=True)
        verdict["fits"] = report.fits

    code = run_guarded(job)
    return code or (0 if verdict["fits"] else EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    sys.exit(main())
