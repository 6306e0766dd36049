"""Every Triton kernel of ``hybridlm.ops`` builds for sm_90 on this machine (no GPU needed).

The interpreter, which runs the CPU tests, never compiles a kernel, so one the compiler rejects
would first fail on the GPU machine. ``benchmarks/kernel_build.py`` runs each op's real launchers
(bf16 and float32 inputs, forward and backward) with the launches captured and compiles each for
sm_90; this test checks it succeeds and that no kernel of the package is left out.

Part of the default run (about a minute on two cores with an empty Triton cache): marked slow, it was deselected
while five kernels of three sessions went unbuilt here (the decode steps' ``_gdn_step_kernel`` and
``_norm_gate_fwd_kernel``, the router's ``_route_kernel``, top-p's ``_sweep_kernel`` and ``_write_kernel``).
"""

import os
import re
import subprocess
import sys

from tests.helpers import ROOT, requires_triton

#: The most shared memory one block of an H100 or H200 may use (227 KiB, ``cudaDevAttrMaxSharedMemoryPerBlockOptin``).
HOPPER_SHARED_BYTES = 227 * 1024


def triton_kernels() -> set[str]:
    """Names of the @triton.jit kernels (``…_kernel``) defined in hybridlm.ops, read from the source
    (the conftest's interpreter mode replaces the JIT objects)."""
    jit = re.compile(r"^@triton\.jit\ndef (\w+_kernel)\(", re.M)
    return {name for path in (ROOT / "src" / "hybridlm" / "ops").glob("*.py") for name in jit.findall(path.read_text())}


@requires_triton
def test_every_kernel_builds_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    script = ROOT / "benchmarks" / "kernel_build.py"
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    built = set(re.findall(r"\| `(\w+)` \|", out.stdout))
    missing = triton_kernels() - built
    assert not missing, f"kernels no op launched in kernel_build.py: {sorted(missing)}"
    assert built and built <= triton_kernels(), out.stdout  # a table, of the package's kernels
    # A kernel asking more shared memory than a block may hold builds, and is refused only at its first launch.
    rows = re.findall(r"^\| (\w+) \| (\w+) \| `(\w+)` \| -?\d+ \| -?\d+ \| (\d+) \|$", out.stdout, re.M)
    assert rows, out.stdout
    over = [row for row in rows if int(row[3]) > HOPPER_SHARED_BYTES]
    assert not over, f"kernels asking more than sm_90's {HOPPER_SHARED_BYTES} bytes of shared memory: {over}"
